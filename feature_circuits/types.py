"""Shared types: site descriptions, method and aggregation kinds, configurations.

Small on purpose: every other module imports from here, nothing here imports them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

#: Repository root (the package is used as an editable install; shipped assets live beside it).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The embedded default model (trained and shipped by the project, see scripts/train_embedded_model.py).
EMBEDDED_MODEL_DIR = REPO_ROOT / "feature_circuits" / "embedded" / "model"
#: Marks-layout root of the embedded SAEs: ``<root>/<model name>/<site dir>/<dict id>/ae.safetensors``.
EMBEDDED_SAE_ROOT = REPO_ROOT / "saes" / "embedded"
EMBEDDED_MODEL_NAME = "tiny-sva"
#: Where scripts/download_saes.py puts the Marks et al. Pythia-70M dictionaries (ignored by git).
MARKS_SAE_ROOT = REPO_ROOT / "saes" / "dictionaries"
DATA_DIR = REPO_ROOT / "data"


class SiteKind(str, enum.Enum):
    """The kinds of place an SAE is spliced into."""

    EMBED = "embed"
    ATTN = "attn"
    MLP = "mlp"
    RESID = "resid"


class Method(str, enum.Enum):
    """Node/edge attribution methods (spec section 3)."""

    EXACT = "exact"
    ATP = "atp"
    IG = "ig"
    RELP = "relp"


class Aggregation(str, enum.Enum):
    """How node/edge effects are combined over positions and examples (spec section 6)."""

    SUM = "sum"
    NONE = "none"


class Architecture(str, enum.Enum):
    GPT_NEOX = "gpt_neox"
    LLAMA = "llama"


@dataclass(frozen=True, kw_only=True)
class Site:
    """One splice point of the model.

    ``name`` is ``embed`` or ``{kind}_{layer}`` (e.g. ``resid_3``); ``module_path`` is the dotted path
    of the module whose output is the activation (e.g. ``gpt_neox.layers.3``); ``output_is_tuple``
    says whether the activation is ``output[0]`` (detected at run time, never assumed).
    ``marks_dir`` is the directory name of this site in the Marks et al. dictionary layout.
    """

    name: str
    kind: SiteKind
    layer: int  # -1 for the embedding
    module_path: str
    output_is_tuple: bool
    d_model: int

    @property
    def marks_dir(self) -> str:
        if self.kind is SiteKind.EMBED:
            return "embed"
        return {SiteKind.ATTN: "attn_out_layer", SiteKind.MLP: "mlp_out_layer", SiteKind.RESID: "resid_out_layer"}[
            self.kind
        ] + str(self.layer)

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward (execution) order: embed, then per layer attn, mlp, resid."""
        rank = {SiteKind.EMBED: 0, SiteKind.ATTN: 1, SiteKind.MLP: 2, SiteKind.RESID: 3}[self.kind]
        return (self.layer, rank)


@dataclass(frozen=True, kw_only=True)
class LRPConfig:
    """Which LRP rules are in force for relevance patching (spec section 5).

    Defaults are the RelP paper's: LN-rule, Identity-rule and Half-rule on, AH-rule off, no epsilon-rule.
    """

    ln_rule: bool = True
    identity_rule: bool = True
    half_rule: bool = True
    ah_rule: bool = False
    epsilon: float | None = None  # epsilon-rule on linear layers when set

    @classmethod
    def off(cls) -> LRPConfig:
        return cls(ln_rule=False, identity_rule=False, half_rule=False, ah_rule=False, epsilon=None)

    @property
    def any(self) -> bool:
        return self.ln_rule or self.identity_rule or self.half_rule or self.ah_rule or self.epsilon is not None
