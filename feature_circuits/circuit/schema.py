"""``circuit.json``, described once: the pydantic models :class:`Node`, :class:`Edge`, :class:`Circuit`.

    circuit = load_circuit("out/circuit.json")        # CircuitError naming the file and field on a problem
    save_circuit(circuit, "out/circuit.json")        # checked by the same reader before it is written
    Node.feature_node("resid_3", 123, effect=0.5)    # id "resid_3/123"
    Node.error_node("resid_3", effect=0.1, position=4)  # id "resid_3@4/err"

This module owns the file format of a thresholded circuit (docs/algorithms.md, "Aggregation and
the circuit graph"): which fields it has, their types, and the graph rules a valid circuit obeys.
The JSON Schema ``circuit.schema.json`` beside this file is *generated* from these models
(:func:`schema_text`; regenerate it with ``python -m feature_circuits.circuit.schema >
feature_circuits/circuit/circuit.schema.json``); a test keeps the two equal.

Node ids: ``resid_3/123`` (aggregation ``sum``), ``resid_3@4/123`` (aggregation ``none``,
position 4); the error node of a site has ``feature`` null and the id ``resid_3/err``
(:data:`~feature_circuits.types.ERROR_TOKEN`; the error-node convention is stated in
:mod:`feature_circuits.types`). ``layer`` is -1 for the embedding. The sink ``logit``
(:data:`~feature_circuits.types.LOGIT_ID`) is not listed among the nodes: it is the target of the
edges from the last residual site (weight = that node's effect).

Files are read in pydantic's strict JSON mode, so what pydantic accepts is what the JSON Schema
accepts (no coercion of ``"3"`` to ``3``); the graph rules the JSON Schema cannot say (unique ids,
edge endpoints, positions per aggregation, ids and kinds that match the site) are model
validators. ``schema_version`` (:data:`SCHEMA_VERSION`) is checked on read and on write; a
``total_effect`` that is not finite is written as null and read back as NaN; ``metric`` (the metric
the circuit was discovered with) defaults to ``logit_diff`` for files written before it existed.

Importing this module imports neither torch nor dictionary_learning (reading a circuit and
printing ``--help`` stay fast).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from feature_circuits.dictionary_info import DictionaryInfo
from feature_circuits.errors import CircuitError
from feature_circuits.metrics import MetricName
from feature_circuits.types import ERROR_TOKEN, LOGIT_ID, Aggregation, Method, Site, SiteKind, error_index

__all__ = [
    "READABLE_VERSIONS",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "Circuit",
    "Context",
    "DictionaryInfo",
    "Edge",
    "Node",
    "NodeActivation",
    "circuit_from_dict",
    "circuit_to_dict",
    "load_circuit",
    "save_circuit",
    "schema_text",
]

#: Version of the circuit.json format this code writes. Version 2 added ``dictionaries`` (what was
#: spliced at each site), ``sites_without_dictionary`` and a node's ``activation`` (where it fires).
SCHEMA_VERSION = 2
#: Versions this code reads (every field added since version 1 is optional).
READABLE_VERSIONS = (1, 2)
#: The committed JSON Schema, generated from :class:`Circuit` (package data).
SCHEMA_PATH = Path(__file__).with_name("circuit.schema.json")
_SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
_SCHEMA_ID = "https://feature-circuits.local/circuit.schema.json"
#: Optional fields, left out of the file when None (the readers before this module rejected null there).
_OMIT_IF_NONE = frozenset({"tokens", "n_layers", "effects_file", "max_abs_effect"})
#: Neuronpedia's address; a node's page is ``{NEURONPEDIA}/{DictionaryInfo.neuronpedia}/{feature}``.
NEURONPEDIA = "https://www.neuronpedia.org"
_MAX_LISTED = 10


def _none_to_nan(value: object) -> object:
    return math.nan if value is None else value


def _nan_to_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


#: A float that may be NaN in Python and is null in the file.
FloatOrNull = Annotated[
    float,
    BeforeValidator(_none_to_nan),
    PlainSerializer(_nan_to_none, return_type=float | None, when_used="json"),
    WithJsonSchema({"type": ["number", "null"]}),
]
#: A finite float (NaN cannot be written to JSON).
Finite = Annotated[float, Field(allow_inf_nan=False)]
_BASE = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Context(BaseModel):
    """One token context where a feature fires: a window of tokens around the firing token."""

    model_config = _BASE

    tokens: tuple[str, ...]
    """The window's tokens, as the tokenizer decodes each one."""
    index: Annotated[int, Field(ge=0)]
    """Position of the firing token within ``tokens``."""
    activation: Finite
    """The feature's activation at the firing token."""
    source: str
    """Where the text came from: ``discovery`` (the discovery data's clean or patch prompts) or
    ``contexts`` (the ``--contexts`` file)."""

    @model_validator(mode="after")
    def _index_in_window(self) -> Context:
        if self.index >= len(self.tokens):
            raise ValueError(f"index {self.index} is outside the {len(self.tokens)} tokens of the context")
        return self


class NodeActivation(BaseModel):
    """Where a node fires: its mean activation on the clean and on the patch inputs (over examples and
    positions) and its top activating contexts, strongest first. For the error node the activation is
    the norm of the error vector."""

    model_config = _BASE

    mean_clean: Finite
    """Mean activation on the clean inputs."""
    mean_patch: Finite
    """Mean activation on the patch (counterfactual) inputs."""
    contexts: tuple[Context, ...] = ()
    """Top activating contexts, strongest first."""


class Node(BaseModel):
    """One kept node: an SAE feature of a site, or the site's error node (``feature`` null)."""

    model_config = _BASE

    id: str
    """``<site>/<feature>`` or ``<site>@<position>/<feature>``; ``err`` in place of the feature for the
    error node."""
    site: str
    """Site name: ``embed``, ``attn_L``, ``mlp_L`` or ``resid_L``."""
    kind: SiteKind
    """Kind of the site (agrees with ``site``)."""
    layer: Annotated[int, Field(ge=-1)]
    """Layer of the site; -1 for the embedding."""
    position: Annotated[int, Field(ge=0)] | None
    """Token position under aggregation ``none``; null under ``sum``."""
    feature: Annotated[int, Field(ge=0)] | None
    """Feature index; null for the error node."""
    is_error: bool
    """True exactly when ``feature`` is null."""
    effect: Finite
    """Aggregated effect of patching the node (clean -> counterfactual) on the metric."""
    activation: NodeActivation | None = None
    """Where the node fires (mean activations and top contexts), when recorded at discovery."""

    # -- ids and constructors (the only place node ids are built)

    @staticmethod
    def make_id(site: str, feature: int | None, position: int | None = None) -> str:
        """``resid_3/123``, ``resid_3@4/123``, ``resid_3/err`` (feature None = the error node)."""
        Site.parse(site)
        where = site if position is None else f"{site}@{int(position)}"
        return f"{where}/{ERROR_TOKEN if feature is None else int(feature)}"

    @classmethod
    def feature_node(cls, site: str, feature: int, effect: float, position: int | None = None) -> Node:
        """The node of feature ``feature`` of ``site`` (at ``position`` under aggregation ``none``)."""
        return cls._make(site, feature, effect, position)

    @classmethod
    def error_node(cls, site: str, effect: float, position: int | None = None) -> Node:
        """The error node of ``site`` (at ``position`` under aggregation ``none``)."""
        return cls._make(site, None, effect, position)

    @classmethod
    def from_index(
        cls, site: str, index: int, n_features: int, effect: float, position: int | None = None
    ) -> Node:
        """The node at ``index`` of a per-node tensor of a site with ``n_features`` features: the error
        node at :func:`~feature_circuits.types.error_index`, feature ``index`` otherwise."""
        feature = None if index == error_index(n_features) else int(index)
        return cls._make(site, feature, effect, position)

    @classmethod
    def _make(cls, site: str, feature: int | None, effect: float, position: int | None) -> Node:
        kind, layer = Site.parse(site)
        return cls(
            id=cls.make_id(site, feature, position),
            site=site,
            kind=kind,
            layer=layer,
            position=position,
            feature=feature,
            is_error=feature is None,
            effect=float(effect),
        )

    @model_validator(mode="after")
    def _agrees_with_site(self) -> Node:
        kind, layer = Site.parse(self.site)
        if (self.kind, self.layer) != (kind, layer):
            raise ValueError(
                f"kind {self.kind.value!r} and layer {self.layer} do not match site {self.site!r} "
                f"(expected {kind.value!r}, {layer})"
            )
        if self.is_error != (self.feature is None):
            raise ValueError("is_error must be true exactly when feature is null")
        want = Node.make_id(self.site, self.feature, self.position)
        if self.id != want:
            raise ValueError(f"id {self.id!r} does not match its site, position and feature ({want!r})")
        return self


class Edge(BaseModel):
    """An edge ``source -> target`` between kept nodes, or from a node of the last residual site to
    the ``logit`` sink."""

    model_config = _BASE

    source: str
    """Id of the upstream node."""
    target: str
    """Id of the downstream node, or ``logit``."""
    weight: Finite
    """Aggregated edge effect (for edges into ``logit``: the source node's effect)."""


def _site_rank(site: str) -> tuple[int, int]:
    return (10**9, 0) if site == LOGIT_ID else Site.rank_of(site)


class Circuit(BaseModel):
    """A sparse feature circuit: the nodes whose aggregated effect passed ``node_threshold`` and the
    edges between them whose weight passed ``edge_threshold``. The sink node ``logit`` is not listed
    in ``nodes``; it is the target of the edges from the last residual site. Graph rules checked by
    the reader beyond this schema: unique node ids, edge endpoints are nodes (or ``logit`` as a
    target), ``position`` null under aggregation ``sum`` and set under ``none``, ``is_error`` true
    exactly when ``feature`` is null, ids, kinds and layers that match the site."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        title="feature_circuits circuit.json",
        json_schema_extra=lambda schema: _schema_extra(schema),
    )

    schema_version: int = SCHEMA_VERSION
    """Version of this format (required in the file)."""
    model: str
    """The model: a short name, a hub id or a local directory."""
    saes: str
    """The dictionaries: a short name or a local directory."""
    method: Method
    """The attribution method the effects were computed with."""
    metric: MetricName = MetricName.LOGIT_DIFF
    """The metric the circuit was discovered with (the evaluation's default)."""
    dataset: str
    """The dataset of clean/counterfactual pairs: a shipped name or a file."""
    split: str
    """The split of the dataset the effects were computed on."""
    num_examples: Annotated[int, Field(ge=0)]
    """Number of examples the effects are averaged over."""
    aggregation: Aggregation
    """``sum`` (positions summed) or ``none`` (one node per position)."""
    node_threshold: Finite
    """Nodes with |effect| above it are kept."""
    edge_threshold: Finite
    """Edges between kept nodes with |weight| above it are kept."""
    total_effect: FloatOrNull
    """Mean of metric(patch) - metric(clean) over the examples; null when not finite."""
    nodes: tuple[Node, ...]
    """The kept nodes, sites in execution order (the ``logit`` sink is not listed)."""
    edges: tuple[Edge, ...]
    """The kept edges, including those into ``logit``."""
    timing_s: dict[str, Finite] = Field(default_factory=dict)
    """Wall time of each stage in seconds."""
    tokens: tuple[str, ...] | None = None
    """Tokens of the first example (aggregation ``none``)."""
    n_layers: Annotated[int, Field(ge=0)] | None = None
    """Number of layers of the model."""
    effects_file: str | None = None
    """Safetensors file, relative to this file's directory, with the aggregated effect of every node:
    one float32 tensor per site, (F+1,) under ``sum`` or (s, F+1) under ``none``, error node last."""
    max_abs_effect: Annotated[Finite, Field(ge=0)] | None = None
    """The largest |effect| of any node, kept or not (what an empty circuit reports)."""
    dictionaries: dict[str, DictionaryInfo] = Field(default_factory=dict)
    """What was spliced at each site that has a dictionary, by site name (empty in version 1 files)."""
    sites_without_dictionary: tuple[str, ...] = ()
    """The model's sites that had no dictionary (not spliced: their effect flows through them, and
    edges run between the spliced sites around them)."""

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value not in READABLE_VERSIONS:
            raise ValueError(_version_problem(value))
        return value

    @model_validator(mode="after")
    def _graph_rules(self) -> Circuit:
        problems: list[str] = []
        seen: set[str] = set()
        for i, nd in enumerate(self.nodes):
            if nd.id in seen:
                problems.append(f"nodes[{i}]: duplicate node id {nd.id!r}")
            seen.add(nd.id)
            if self.aggregation is Aggregation.SUM and nd.position is not None:
                problems.append(f"nodes[{i}].position: must be null under aggregation 'sum'")
            if self.aggregation is Aggregation.NONE and nd.position is None:
                problems.append(f"nodes[{i}].position: required under aggregation 'none'")
        for i, ed in enumerate(self.edges):
            if ed.source not in seen:
                problems.append(f"edges[{i}].source: unknown node {ed.source!r}")
            if ed.target not in seen and ed.target != LOGIT_ID:
                problems.append(f"edges[{i}].target: unknown node {ed.target!r}")
        if problems:
            raise ValueError(_listing(problems))
        return self

    # -- views

    def neuronpedia_url(self, node: Node) -> str | None:
        """The node's Neuronpedia page, when its site's dictionary has a Neuronpedia id (never for the
        error node)."""
        info = self.dictionaries.get(node.site)
        if node.feature is None or info is None or not info.neuronpedia:
            return None
        return f"{NEURONPEDIA}/{info.neuronpedia}/{int(node.feature)}"

    def replace(self, **changes: object) -> Circuit:
        """A copy with ``changes`` applied, validated like a new circuit."""
        return type(self).model_validate({**dict(self), **changes})

    def nodes_by_site(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for nd in self.nodes:
            out.setdefault(nd.site, []).append(nd)
        return out

    @property
    def num_layers(self) -> int:
        """``n_layers`` when recorded, else one more than the highest layer of a node."""
        if self.n_layers is not None:
            return self.n_layers
        return 1 + max((nd.layer for nd in self.nodes), default=-1)

    def summary(self) -> str:
        """Nodes and edges per site, total effect and time, as a short text."""
        time = (
            ["time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timing_s.items())] if self.timing_s else []
        )
        if not self.nodes:
            return "\n".join([self.empty_note(), *time])
        by_site = self.nodes_by_site()
        edges_in: dict[str, int] = {}
        site_of = {nd.id: nd.site for nd in self.nodes}
        for e in self.edges:
            tgt = site_of.get(e.target, e.target)
            edges_in[tgt] = edges_in.get(tgt, 0) + 1
        order = sorted(set(by_site) | set(edges_in), key=_site_rank)
        lines = [f"{'site':<10} {'nodes':>6} {'(err)':>6} {'edges in':>9}"]
        for s in order:
            nds = by_site.get(s, [])
            lines.append(f"{s:<10} {len(nds):>6} {sum(n.is_error for n in nds):>6} {edges_in.get(s, 0):>9}")
        lines.append(
            f"total: {len(self.nodes)} nodes, {len(self.edges)} edges; total effect {self.total_effect:+.4f} "
            f"over {self.num_examples} examples"
        )
        return "\n".join([*lines, *time])

    def empty_note(self) -> str:
        """What an empty circuit says: no node above its threshold, and the largest |effect|."""
        largest = "" if self.max_abs_effect is None else f" (largest |effect| is {self.max_abs_effect:.4g})"
        return (
            f"no node above threshold {self.node_threshold:g}{largest}; total effect "
            f"{self.total_effect:+.4f} over {self.num_examples} examples"
        )


def _version_problem(value: object) -> str:
    readable = ", ".join(str(v) for v in READABLE_VERSIONS)
    return f"unsupported schema_version {value!r} (this version of feature_circuits reads {readable})"


def _schema_extra(schema: dict[str, Any]) -> None:
    """``$schema``, ``$id``, and ``schema_version`` required in the file (it has a default in Python
    only so that code need not pass it)."""
    schema["$schema"] = _SCHEMA_URI
    schema["$id"] = _SCHEMA_ID
    schema["required"] = ["schema_version", *schema.get("required", [])]
    schema["properties"]["schema_version"]["enum"] = list(READABLE_VERSIONS)


def schema_text() -> str:
    """The JSON Schema of circuit.json, as committed in ``circuit.schema.json``:
    ``Circuit.model_json_schema()`` less the docstrings of the shared enums (``types``, ``metrics``),
    so that the file describes their values and a reworded docstring elsewhere leaves it alone."""
    schema = Circuit.model_json_schema()
    for definition in schema.get("$defs", {}).values():
        if "enum" in definition:
            definition.pop("description", None)
    return json.dumps(schema, indent=2) + "\n"


# -------------------------------------------------------------------------------------- reading, writing


def _listing(problems: list[str]) -> str:
    more = "" if len(problems) <= _MAX_LISTED else f"\n  ... and {len(problems) - _MAX_LISTED} more"
    return "\n  ".join(problems[:_MAX_LISTED]) + more


def _where(loc: tuple[int | str, ...]) -> str:
    """``("nodes", 0, "effect")`` -> ``nodes[0].effect``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problems(err: ValidationError) -> list[str]:
    out: list[str] = []
    for e in err.errors(include_url=False):
        msg = str(e["msg"]).removeprefix("Value error, ")
        where = _where(tuple(e["loc"]))
        line = f"{where}: {msg}" if where else msg
        if e["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in e:
            line += f" (got {e['input']!r:.60})"
        if line not in out:
            out.append(line)
    return out


def _parse(text: str, source: str) -> Circuit:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CircuitError(f"{source}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CircuitError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    if "schema_version" not in raw:
        raise CircuitError(f"{source}: missing 'schema_version' (not a feature_circuits circuit.json?)")
    if raw["schema_version"] not in READABLE_VERSIONS:
        raise CircuitError(f"{source}: {_version_problem(raw['schema_version'])}")
    try:
        return Circuit.model_validate_json(text, strict=True)
    except ValidationError as err:
        raise CircuitError(f"{source}: invalid circuit:\n  " + _listing(_problems(err))) from None


def circuit_to_dict(circuit: Circuit) -> dict[str, Any]:
    """The circuit.json document (optional fields left out when None)."""
    omit: dict[str, Any] = {k: True for k in _OMIT_IF_NONE if getattr(circuit, k) is None}
    no_activation = {i: {"activation"} for i, nd in enumerate(circuit.nodes) if nd.activation is None}
    if no_activation:  # a node's activation is left out when it was not recorded
        omit["nodes"] = no_activation
    return circuit.model_dump(mode="json", exclude=omit)  # pyright: ignore[reportArgumentType]


def circuit_from_dict(data: Mapping[str, Any], source: str = "circuit") -> Circuit:
    """Check a parsed circuit.json (schema version, the schema, the graph rules) and build the
    :class:`Circuit`; :class:`CircuitError` naming ``source`` and each offending field otherwise."""
    try:
        text = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CircuitError(f"{source}: not a JSON document ({err})") from None
    return _parse(text, source)


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Write ``circuit.json``, after checking the document with the reader :func:`load_circuit` uses;
    :class:`CircuitError` naming the file and field on a problem."""
    path = Path(path)
    try:
        text = json.dumps(circuit_to_dict(circuit), indent=1, allow_nan=False) + "\n"
    except ValueError as err:  # a non-finite number in a circuit built without validation
        raise CircuitError(f"{path}: cannot be written as JSON ({err})") from None
    _parse(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_circuit(path: str | Path) -> Circuit:
    """Read and check ``circuit.json``; :class:`CircuitError` naming the file (and the field) on any
    problem."""
    path = Path(path)
    if not path.is_file():
        raise CircuitError(f"circuit file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CircuitError(f"{path}: not readable as UTF-8 text ({err})") from None
    return _parse(text, str(path))


if __name__ == "__main__":
    print(schema_text(), end="")
