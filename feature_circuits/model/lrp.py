"""LRP rules as patched submodules (RelP; docs/algorithms.md, "LRP rules").

``install_lrp(hf_model)`` rewrites submodules of a GPT-NeoX, Llama-family or Gemma 2 / 3 model so that the
forward pass is unchanged (bit-identical logits: every rule's forward calls the original op) and,
while a rule is switched on, the backward pass returns LRP propagation coefficients instead of the
plain gradient. It must run BEFORE nnsight wraps the model (nnsight fixes each module's forward when
it wraps), so it is meant to be passed as ``load_model(..., before_wrap=install_lrp)``.

Rules (custom ``torch.autograd.Function``s, forward = original op):

* LN-rule (LayerNorm, RMSNorm): 1/sigma treated as constant.
  LayerNorm: grad_x = (g*w - mean(g*w)) / sigma; RMSNorm: grad_x = g*w / rms; Gemma's (1+w) RMSNorm:
  grad_x = g*(1+w) / rms -- on every norm: pre-, post- and final norms, Gemma 3's q_norm / k_norm.
* Identity-rule (GELU and its tanh approximation, SiLU): grad_x = g * act(x)/x, with the finite limit
  0.5 at x = 0.
* AH-rule (attention): the attention weights are constant, relevance flows through v only
  (the q and k projections' outputs are detached; the detach does not change any value).
* Half-rule (gated MLP product act(g)*u, Llama-family SwiGLU and Gemma GeGLU): each factor gets half:
  grad_a = 0.5*g*b.
* Gemma's soft-caps (attention logits in Gemma 2, final logits) and its sqrt(d_model) embedding scale
  keep their plain gradient (docs/algorithms.md, "LRP rules", says what that gives).
* epsilon-rule (optional, on every nn.Linear): the output gradient is scaled by z / (z + eps*sign(z)),
  sign(0) = +1.

The rules are off by default; ``with controller.use(LRPConfig()):`` switches them on for the
forward passes run inside the block (the graph built then carries the rule's backward, so the
backward itself may run after the block). The same loaded model therefore serves exact, atp, ig
(all rules off: plain gradients) and relp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feature_circuits.errors import ConfigError
from feature_circuits.model.sites import detect_architecture, get_submodule
from feature_circuits.types import Architecture, LRPConfig

if TYPE_CHECKING:
    from feature_circuits.model.loading import LoadedModel

    # What each mixin is mixed into (for the type checker; at run time they are plain mixins put in
    # front of the module's own class by ``_swap_class``).
    _LayerNormBase = nn.LayerNorm
    _ModuleBase = nn.Module
    _LinearBase = nn.Linear
else:
    _LayerNormBase = _ModuleBase = _LinearBase = object

_ATTR = "_lrp_controller"


class LRPController:
    """Runtime switch of the LRP rules installed into one model."""

    def __init__(self) -> None:
        self.config: LRPConfig = LRPConfig.off()
        self.patched: dict[str, list[str]] = {}

    @contextlib.contextmanager
    def use(self, config: LRPConfig | None) -> Iterator[LRPController]:
        """Rules of ``config`` active inside the block (``None``: all off)."""
        prev = self.config
        self.config = LRPConfig.off() if config is None else config
        try:
            yield self
        finally:
            self.config = prev

    def _note(self, rule: str, name: str) -> None:
        self.patched.setdefault(rule, []).append(name)


# ---------------------------------------------------------------- autograd Functions


class _LayerNormLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        y = F.layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight)
        ctx.n_dims = len(normalized_shape)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        dims = tuple(range(-ctx.n_dims, 0))
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        sigma = torch.sqrt(xc.var(dim=dims, unbiased=False, keepdim=True) + ctx.eps)
        gw = g.to(xc.dtype) * weight.to(xc.dtype) if weight is not None else g.to(xc.dtype)
        grad = (gw - gw.mean(dim=dims, keepdim=True)) / sigma
        return grad.to(x.dtype), None, None, None, None


class _RMSNormLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, weight, eps, offset):
        y = fn(x)
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        rms = torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + ctx.eps)
        w = weight.to(xc.dtype) + ctx.offset
        grad = g.to(xc.dtype) * w / rms
        return grad.to(x.dtype), None, None, None, None


class _IdentityRule(torch.autograd.Function):
    """y = act(x); grad_x = g * act(x)/x, limit 0.5 at x = 0 (GELU and SiLU)."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        zero = x == 0
        ratio = y / torch.where(zero, torch.ones_like(x), x)
        ratio = torch.where(zero, torch.full_like(x, 0.5), ratio)
        return g * ratio, None


class _HalfProduct(torch.autograd.Function):
    """y = a * b; each factor receives half of the relevance."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = 0.5 * g * b if ctx.needs_input_grad[0] else None
        gb = 0.5 * g * a if ctx.needs_input_grad[1] else None
        return ga, gb


class _EpsilonScale(torch.autograd.Function):
    """Identity forward on a linear output z; backward scales g by z / (z + eps*sign(z))."""

    @staticmethod
    def forward(ctx, z, eps):
        ctx.save_for_backward(z)
        ctx.eps = eps
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        z32 = (
            z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        )  # eps underflows in half precision
        sign = torch.where(z32 >= 0, torch.ones_like(z32), -torch.ones_like(z32))
        return (g * (z32 / (z32 + ctx.eps * sign))).to(g.dtype), None


def identity_rule(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(x)`` whose backward is the Identity-rule."""
    return _IdentityRule.apply(x, fn)


def half_product(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` whose backward is the Half-rule."""
    return _HalfProduct.apply(a, b)


# ---------------------------------------------------------------- patched module classes

_SUBCLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type, ctrl: LRPController) -> None:
    base = type(module)
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"LRP{base.__name__}", (mixin, base), {})
    module.__class__ = _SUBCLASSES[key]
    object.__setattr__(module, _ATTR, ctrl)


class _LayerNormMixin(_LayerNormBase):
    def forward(self, x: Tensor) -> Tensor:
        ctrl = getattr(self, _ATTR)
        if ctrl.config.ln_rule and torch.is_grad_enabled():
            return _LayerNormLN.apply(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(x)


class _RMSNormMixin(_ModuleBase):
    weight: nn.Parameter

    def forward(self, x: Tensor) -> Tensor:
        ctrl = getattr(self, _ATTR)
        if ctrl.config.ln_rule and torch.is_grad_enabled():
            eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
            offset = 1.0 if "gemma" in type(self).__mro__[2].__name__.lower() else 0.0
            return _RMSNormLN.apply(x, super().forward, self.weight, eps, offset)
        return super().forward(x)


class _ActivationMixin(_ModuleBase):
    def forward(self, x: Tensor) -> Tensor:
        ctrl = getattr(self, _ATTR)
        if ctrl.config.identity_rule and torch.is_grad_enabled():
            return _IdentityRule.apply(x, super().forward)
        return super().forward(x)


class _GatedMLPMixin(_ModuleBase):
    """Llama-family MLP: down(act(gate(x)) * up(x)) with the Half-rule on the product."""

    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act_fn: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        ctrl = getattr(self, _ATTR)
        if ctrl.config.half_rule and torch.is_grad_enabled():
            return self.down_proj(_HalfProduct.apply(self.act_fn(self.gate_proj(x)), self.up_proj(x)))
        return super().forward(x)


class _LinearMixin(_LinearBase):
    """nn.Linear with the optional epsilon-rule and, for attention q/k projections, the AH-rule."""

    _lrp_qk_mask: Tensor | None = None  # packed q|k|v output: True where the column is q or k
    _lrp_is_qk: bool = False

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        ctrl = getattr(self, _ATTR)
        cfg = ctrl.config
        if not torch.is_grad_enabled():
            return out
        if cfg.epsilon is not None:
            out = _EpsilonScale.apply(out, float(cfg.epsilon))
        if cfg.ah_rule:
            if self._lrp_is_qk:
                out = out.detach()
            elif self._lrp_qk_mask is not None:
                mask = self._lrp_qk_mask.to(out.device)
                out = torch.where(mask, out.detach(), out)
        return out


def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight")


def _is_act(m: nn.Module) -> bool:
    name = type(m).__name__
    return name in {
        "GELUActivation",
        "SiLUActivation",
        "GELU",
        "SiLU",
        "NewGELUActivation",
        "GELUTanh",
        "FastGELUActivation",
        "GELUTanhActivation",
        "PytorchGELUTanh",
    }


def install_lrp(hf_model: nn.Module) -> LRPController:
    """Patch the LRP rules into ``hf_model`` (GPT-NeoX, Llama family, Gemma 2 / 3), all switched off.

    Idempotent: a second call returns the existing controller. Call before nnsight wraps the model.
    """
    existing = getattr(hf_model, _ATTR, None)
    if isinstance(existing, LRPController):
        return existing
    arch = detect_architecture(hf_model)
    ctrl = LRPController()
    for name, m in list(hf_model.named_modules()):
        if isinstance(m, nn.LayerNorm):
            _swap_class(m, _LayerNormMixin, ctrl)
            ctrl._note("ln", name)
        elif _is_rmsnorm(m):
            _swap_class(m, _RMSNormMixin, ctrl)
            ctrl._note("ln", name)
        elif _is_act(m):
            _swap_class(m, _ActivationMixin, ctrl)
            ctrl._note("identity", name)
        elif isinstance(m, nn.Linear):
            _swap_class(m, _LinearMixin, ctrl)
    if arch is Architecture.GPT_NEOX:
        for i, layer in enumerate(cast(nn.ModuleList, get_submodule(hf_model, "gpt_neox.layers"))):
            qkv = cast(nn.Linear, get_submodule(layer, "attention.query_key_value"))
            hs = int(get_submodule(layer, "attention").head_size)
            n_heads = qkv.out_features // (3 * hs)
            col = torch.arange(qkv.out_features) % (3 * hs)
            assert n_heads * 3 * hs == qkv.out_features
            object.__setattr__(qkv, "_lrp_qk_mask", col < 2 * hs)
            ctrl._note("ah", f"gpt_neox.layers.{i}.attention.query_key_value")
    else:
        for i, layer in enumerate(cast(nn.ModuleList, get_submodule(hf_model, "model.layers"))):
            for proj in ("q_proj", "k_proj"):
                object.__setattr__(getattr(layer.self_attn, proj), "_lrp_is_qk", True)
            ctrl._note("ah", f"model.layers.{i}.self_attn")
            mlp = cast(nn.Module, get_submodule(layer, "mlp"))
            if all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                _swap_class(mlp, _GatedMLPMixin, ctrl)
                ctrl._note("half", f"model.layers.{i}.mlp")
    object.__setattr__(hf_model, _ATTR, ctrl)
    return ctrl


def get_lrp_controller(model: LoadedModel | nn.Module) -> LRPController:
    """The controller of a LoadedModel (or HF model) patched by ``install_lrp``."""
    hf = getattr(model, "hf_model", model)
    ctrl = getattr(hf, _ATTR, None)
    if not isinstance(ctrl, LRPController):
        raise ConfigError(
            "LRP rules are not installed in this model: load it with "
            "load_model(..., before_wrap=install_lrp) or feature_circuits.attribution.load_for_attribution"
        )
    return ctrl


def lrp_context(
    model: LoadedModel | nn.Module, config: LRPConfig | None
) -> contextlib.AbstractContextManager[object]:
    """``controller.use(config)`` if rules are needed, else a null context (works on unpatched models
    when ``config`` is None or all-off)."""
    if config is None or not config.any:
        hf = getattr(model, "hf_model", model)
        ctrl = getattr(hf, _ATTR, None)
        return ctrl.use(LRPConfig.off()) if isinstance(ctrl, LRPController) else contextlib.nullcontext()
    return get_lrp_controller(model).use(config)
