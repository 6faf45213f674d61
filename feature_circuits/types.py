"""The vocabulary every stage shares: sites and their names, methods, aggregations, LRP rules, and
the error-node convention.

No paths, no I/O, no torch: importing this module is free, and nothing here imports the rest of the
package (every other module imports from here).

Sites and their names
---------------------
A *site* is a place where a dictionary (SAE) is spliced into the model: the embedding output
(``embed``) and, for every layer ``L``, the attention output (``attn_L``), the MLP output
(``mlp_L``) and the residual stream after the layer (``resid_L``); plus, spliced only where a
dictionary is given for it, the per-head attention outputs before the output projection
(``attn_z_L``, flattened to ``n_heads * d_head``; TransformerLens's ``hook_z``). :class:`Site` owns
these names: :meth:`Site.format` builds one, :meth:`Site.parse` reads one back,
:meth:`Site.rank_of` orders them in execution order (embed, then per layer attn_z, attn, mlp,
resid). Nobody else formats or parses a site name.

The error node
--------------
Each site also has one *error node*: the part of the activation the dictionary does not
reconstruct, ``err = x - decode(encode(x))``. The one convention, used everywhere:

* in a tensor of per-node values of a site with ``F`` features (effects, masks' feature axis plus
  one), index ``F`` -- the last one -- is the error node (:func:`error_index`);
* in a circuit node, ``feature`` is ``None`` for the error node and its id is ``<site>/err``
  (:data:`ERROR_TOKEN`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "ERROR_TOKEN",
    "LOGIT_ID",
    "Aggregation",
    "Architecture",
    "LRPConfig",
    "Method",
    "Site",
    "SiteKind",
    "error_index",
]

#: The token that stands for the error node in node ids (``resid_3/err``).
ERROR_TOKEN = "err"
#: Id of the sink node (the metric) fed by the last residual site.
LOGIT_ID = "logit"


def error_index(n_features: int) -> int:
    """Index of the error node in a per-node tensor of a site with ``n_features`` features: the
    last one (features are ``0 .. n_features - 1``)."""
    return n_features


class SiteKind(str, enum.Enum):
    """The kinds of place a dictionary is spliced into, in execution order within a layer."""

    EMBED = "embed"
    ATTN_Z = "attn_z"
    ATTN = "attn"
    MLP = "mlp"
    RESID = "resid"


_KIND_RANK = {SiteKind.EMBED: 0, SiteKind.ATTN_Z: 1, SiteKind.ATTN: 2, SiteKind.MLP: 3, SiteKind.RESID: 4}
_SITE_RE = re.compile(r"^(?:(embed)|(attn_z|attn|mlp|resid)_(\d+))$")
#: Directory name of each site kind in the Marks et al. dictionary layout (``resid_out_layer3``).
_MARKS_DIR = {
    SiteKind.ATTN: "attn_out_layer",
    SiteKind.MLP: "mlp_out_layer",
    SiteKind.RESID: "resid_out_layer",
}


class Method(str, enum.Enum):
    """Node/edge attribution methods (docs/algorithms.md, "Methods")."""

    EXACT = "exact"
    ATP = "atp"
    IG = "ig"
    RELP = "relp"


class Aggregation(str, enum.Enum):
    """How node/edge effects are combined over positions and examples (docs/algorithms.md,
    "Aggregation and the circuit graph"): ``sum`` sums over positions and averages over examples;
    ``none`` keeps positions (examples of one token length)."""

    SUM = "sum"
    NONE = "none"


class Architecture(str, enum.Enum):
    """Model families whose sites and LRP rules are known (docs/hooks.md): GPT-NeoX (Pythia);
    Llama family (Llama, Qwen2, Qwen3, Mistral: ``model.layers[l]`` with pre-norms only); Gemma 2
    and Gemma 3 (post-norms on the attention and MLP outputs before the residual add)."""

    GPT_NEOX = "gpt_neox"
    LLAMA = "llama"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3"

    @property
    def post_norms(self) -> bool:
        """Whether attention and MLP outputs pass through a norm before the residual add."""
        return self in (Architecture.GEMMA2, Architecture.GEMMA3)


@dataclass(frozen=True, kw_only=True)
class Site:
    """One splice point of a model.

    ``kind`` and ``layer`` (``-1`` for the embedding) identify it; :attr:`name` is derived from them.
    ``module_path`` is the dotted path of the module whose output is the activation (e.g.
    ``gpt_neox.layers.3``); ``output_is_tuple`` says whether the activation is ``output[0]``
    (detected at run time, never assumed); ``reads_input``: the activation is the module's first
    INPUT instead (``attn_z``: the input of the attention output projection); ``d_model`` is the
    activation width.
    """

    kind: SiteKind
    layer: int
    module_path: str = ""
    output_is_tuple: bool = False
    reads_input: bool = False
    d_model: int = 0

    def __post_init__(self) -> None:
        if (self.kind is SiteKind.EMBED) != (self.layer == -1) or self.layer < -1:
            raise ValueError(f"site kind {self.kind.value} cannot have layer {self.layer}")

    # -- names (the only place they are built or read)

    @staticmethod
    def format(kind: SiteKind | str, layer: int) -> str:
        """``(resid, 3)`` -> ``resid_3``; ``(embed, -1)`` -> ``embed``."""
        kind = SiteKind(kind)
        return kind.value if kind is SiteKind.EMBED else f"{kind.value}_{int(layer)}"

    @staticmethod
    def parse(name: str) -> tuple[SiteKind, int]:
        """``resid_3`` -> ``(SiteKind.RESID, 3)``; ``embed`` -> ``(SiteKind.EMBED, -1)``. Raises
        ``ValueError`` for anything else."""
        m = _SITE_RE.match(name) if isinstance(name, str) else None
        if m is None:
            raise ValueError(
                f"not a site name: {name!r} (expected embed, attn_z_L, attn_L, mlp_L or resid_L)"
            )
        if m.group(1):
            return SiteKind.EMBED, -1
        return SiteKind(m.group(2)), int(m.group(3))

    @staticmethod
    def is_name(name: str) -> bool:
        return isinstance(name, str) and _SITE_RE.match(name) is not None

    @staticmethod
    def rank_of(name: str) -> tuple[int, int]:
        """Execution-order sort key of a site name: embed, then per layer attn_z, attn, mlp, resid."""
        kind, layer = Site.parse(name)
        return (layer, _KIND_RANK[kind])

    @property
    def name(self) -> str:
        return Site.format(self.kind, self.layer)

    @property
    def rank(self) -> tuple[int, int]:
        """Sort key in forward (execution) order."""
        return (self.layer, _KIND_RANK[self.kind])

    @property
    def marks_dir(self) -> str:
        """Directory name of this site in the Marks et al. dictionary layout (which has no
        ``attn_z`` sites: ``ValueError`` for those)."""
        if self.kind is SiteKind.EMBED:
            return "embed"
        if self.kind not in _MARKS_DIR:
            raise ValueError(
                f"site {self.name}: the Marks et al. dictionary layout has no {self.kind.value} sites"
            )
        return f"{_MARKS_DIR[self.kind]}{self.layer}"


@dataclass(frozen=True, kw_only=True)
class LRPConfig:
    """Which LRP rules are in force for relevance patching (docs/algorithms.md, "LRP rules").

    Defaults are the RelP paper's: LN-rule, Identity-rule and Half-rule on, AH-rule off, no
    epsilon-rule.
    """

    ln_rule: bool = True
    identity_rule: bool = True
    half_rule: bool = True
    ah_rule: bool = False
    epsilon: float | None = None  # epsilon-rule on linear layers when set

    def __post_init__(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"LRPConfig.epsilon must be > 0 or None, got {self.epsilon}")

    @classmethod
    def off(cls) -> LRPConfig:
        return cls(ln_rule=False, identity_rule=False, half_rule=False, ah_rule=False, epsilon=None)

    @property
    def any(self) -> bool:
        return (
            self.ln_rule or self.identity_rule or self.half_rule or self.ah_rule or self.epsilon is not None
        )
