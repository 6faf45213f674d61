"""The attribution methods, one entry each: a :class:`MethodSpec` with the method's options
dataclass and its node-effect function (docs/algorithms.md, "Methods").

Each method lives in its own module (:mod:`.exact`, :mod:`.atp`, :mod:`.relp`, :mod:`.ig`) and
registers itself with :func:`register` when imported; :func:`method_spec` imports the built-in
modules on first use. :func:`~feature_circuits.attribution.node_effects` dispatches through this
table, so adding a method is adding a module.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from feature_circuits.errors import ConfigError
from feature_circuits.types import LRPConfig, Method

if TYPE_CHECKING:
    from feature_circuits.attribution.results import NodeEffects
    from feature_circuits.data import Batch
    from feature_circuits.dictionaries import Dictionary
    from feature_circuits.metrics import Metric
    from feature_circuits.model.loading import LoadedModel
    from feature_circuits.types import Site

__all__ = [
    "METHODS",
    "AtpOptions",
    "ExactOptions",
    "IGOptions",
    "MethodOptions",
    "MethodSpec",
    "NodeFunction",
    "NodeRequest",
    "RelPOptions",
    "method_spec",
    "options_as",
    "register",
]

#: Modules of the built-in methods (each calls :func:`register` on import).
_BUILTIN = (
    "feature_circuits.attribution.exact",
    "feature_circuits.attribution.atp",
    "feature_circuits.attribution.relp",
    "feature_circuits.attribution.ig",
)


def _at_least(owner: str, name: str, value: int | None, low: int) -> None:
    if value is not None and not (isinstance(value, int) and value >= low):
        raise ConfigError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ExactOptions:
    """exact: ``max_nodes`` caps the feature nodes patched per site (the largest |delta| first; the
    others get NaN), ``chunk_size`` single-node patches share one forward; ``resume``: patched
    forwards start at the patched site from the clean run's state (:mod:`feature_circuits.model.resume`;
    False, or a model it cannot run: full re-runs); ``progress``: a progress bar (None: when stderr
    is a terminal)."""

    max_nodes: int | None = None
    chunk_size: int = 128
    resume: bool = True
    progress: bool | None = None

    def __post_init__(self) -> None:
        _at_least("ExactOptions", "max_nodes", self.max_nodes, 1)
        _at_least("ExactOptions", "chunk_size", self.chunk_size, 1)


@dataclass(frozen=True, kw_only=True)
class AtpOptions:
    """atp has no options."""


@dataclass(frozen=True, kw_only=True)
class RelPOptions:
    """relp: the LRP rules in force during its forward (and its edges' backward)."""

    lrp: LRPConfig = dataclasses.field(default_factory=LRPConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.lrp, LRPConfig):
            raise ConfigError(f"RelPOptions.lrp must be an LRPConfig, got {type(self.lrp).__name__}")


@dataclass(frozen=True, kw_only=True)
class IGOptions:
    """ig: ``steps`` integration steps; ``max_rows`` rows (steps x examples) per forward;
    ``progress``: a progress bar (None: when stderr is a terminal)."""

    steps: int = 10
    max_rows: int = 512
    progress: bool | None = None

    def __post_init__(self) -> None:
        _at_least("IGOptions", "steps", self.steps, 1)
        _at_least("IGOptions", "max_rows", self.max_rows, 1)


MethodOptions = ExactOptions | AtpOptions | RelPOptions | IGOptions
_O = TypeVar("_O", bound=MethodOptions)


@dataclass(frozen=True, kw_only=True)
class NodeRequest:
    """What a method's node pass reads: the model, its dictionaries, one batch, the metric, whether
    the patch state is the counterfactual input (else every node zero), which sites (names;
    ``None``: every site with a dictionary) and the feature path (``auto``, ``dense``, ``sparse``:
    :func:`~feature_circuits.attribution.forward.use_sparse`)."""

    loaded: LoadedModel
    dictionaries: Mapping[str, Dictionary]
    batch: Batch
    metric: Metric
    counterfactual: bool = True
    sites: tuple[str, ...] | None = None
    feature_path: str = "auto"

    def site_list(self) -> list[Site]:
        """The requested sites that have a dictionary, in forward order."""
        from feature_circuits.attribution.forward import attribution_sites

        return attribution_sites(self.loaded, self.dictionaries, self.sites)


#: A method's node effects of one batch: ``(b, s, F+1)`` per site, error node last.
NodeFunction = Callable[[NodeRequest, MethodOptions], "NodeEffects"]


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One attribution method: its options dataclass, its node function, whether its node pass has
    gradients (edges need them) and the LRP rules its gradients run with."""

    method: Method
    options: type[MethodOptions]
    node_effects: NodeFunction
    has_gradients: bool = True

    def check_options(self, options: MethodOptions | None) -> MethodOptions:
        """``options`` if they are this method's (``None``: the defaults), else a ConfigError."""
        return options_as(self.options, options, self.method)

    def options_from(self, values: Mapping[str, object]) -> MethodOptions:
        """This method's options built from those of ``values`` that name one of its fields (a
        config that holds every method's settings, e.g. ``steps``, hands each method its own);
        a ``None`` value means the field's default."""
        names = {f.name for f in dataclasses.fields(self.options)}
        return self.options(**{k: v for k, v in values.items() if k in names and v is not None})  # pyright: ignore[reportArgumentType]

    def backward_lrp(self, lrp: LRPConfig | None = None) -> LRPConfig | None:
        """The LRP rules a backward of this method runs with: ``lrp`` (default ``LRPConfig()``) for
        a method with :class:`RelPOptions`, ``None`` (plain gradients) for the others."""
        if self.options is not RelPOptions:
            return None
        return RelPOptions().lrp if lrp is None else lrp


def options_as(cls: type[_O], options: MethodOptions | None, method: Method) -> _O:
    """``options`` as ``method``'s options class ``cls`` (``None``: its defaults); a ConfigError
    naming both when they are another method's."""
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise ConfigError(f"method {method.value} takes {cls.__name__}, got {type(options).__name__}")
    return options


#: The registered methods.
METHODS: dict[Method, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to :data:`METHODS` (once per method)."""
    if spec.method in METHODS and METHODS[spec.method] is not spec:
        raise ValueError(f"method {spec.method.value} is registered twice")
    METHODS[spec.method] = spec
    return spec


def method_spec(method: Method | str) -> MethodSpec:
    """The registered spec of ``method`` (a :class:`Method` or its name)."""
    try:
        key = Method(method)
    except ValueError:
        raise ConfigError(f"unknown method {method!r}; choose one of {[m.value for m in Method]}") from None
    if key not in METHODS:
        for module in _BUILTIN:
            importlib.import_module(module)
    if key not in METHODS:
        raise ConfigError(f"method {key.value} has no registered implementation")
    return METHODS[key]
