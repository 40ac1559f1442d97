"""Quantized modules: the tensor quantizer, quantized Linear/Conv2d, and the rewritten attention.

* :class:`TensorQuantizer` fake-quantizes one tensor (a weight or an activation) with a bit-width, a
  format (symmetric or asymmetric), a granularity, static (s, z) from an observer or dynamic (s, z) from
  each input. Lifecycle: built in ``calibrate`` mode (observe statistics, pass float through), then
  :meth:`~TensorQuantizer.freeze` fixes (s, z) and switches to ``quantize``.
* :class:`QuantLinear` / :class:`QuantConv2d` replace a ``nn.Linear``/``nn.Conv2d`` *keeping its weight and
  bias Parameters* (same objects, same names in the state dict, so QAT trains them) and feed the float
  kernel the fake-quantized weight and the fake-quantized *input* (``quantizers.md`` §1.1).
* :class:`QuantizableMultiheadAttention` replaces ``nn.MultiheadAttention`` (``models.md`` §6.2), whose
  fused ``in_proj_weight`` and direct use of ``out_proj.weight`` hide its projections from module wrapping;
  the rewrite makes q/k/v/out real ``nn.Linear`` modules and adds the identity slots ``q``, ``k``, ``v``,
  ``probs`` for methods that quantize attention.
* :func:`quantize_modules` wraps every in-scope module of a VLM from two factories, so a method's plugin
  only says which quantizer goes where.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from enum import Enum
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from qbench.model import VLM
from qbench.quant.fake_quant import (
    Granularity,
    QuantFormat,
    fake_quantize_grouped,
    fused_enabled,
    minmax_qparams,
)
from qbench.quant.observers import Observer, make_observer, select_valid_tokens
from qbench.quant.spec import FLOAT_ACTIVATION_BITS

__all__ = [
    "TensorQuantizer", "make_activation_quantizer", "make_weight_quantizer", "quantize_modules",
    "rewrite_tower_attention"
]


# -- tensor quantizer ------------------------------------------------------------------------------
class Mode(str, Enum):
    """``calibrate``: observe and pass float through; ``quantize``: fake-quantize; ``off``: identity."""

    CALIBRATE = "calibrate"
    QUANTIZE = "quantize"
    OFF = "off"


class UncalibratedError(RuntimeError):
    """A static quantizer was used to quantize before any statistics fixed its (s, z)."""


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor: ``bits``, symmetric or not, a granularity, static or dynamic.

    Static quantizers get (s, z) per group from their observer at :meth:`freeze` and keep them as the
    buffers ``scale`` and ``zero_point`` (shape ``(n_groups,)``, saved in the state dict). Dynamic
    quantizers compute (s, z) from each input's own min/max (per-token activations must be dynamic).
    In ``calibrate`` mode an activation quantizer observes only valid text positions when a
    :func:`qbench.quant.observers.valid_tokens` mask is active.

    The verifier relies on :attr:`bits`, :attr:`granularity` and :meth:`group_view`; methods with other
    estimators (LSQ) subclass this and override :meth:`quantize`.
    """

    def __init__(
        self,
        bits: int,
        *,
        symmetric: bool,
        granularity: "str | Granularity" = "per_tensor",
        dynamic: bool = False,
        observer: str = "minmax",
        narrow: bool = True,
        observer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.fmt = QuantFormat(bits, symmetric, narrow)
        self.granularity = Granularity.parse(granularity)
        if self.granularity.dynamic_only and not dynamic:
            raise ValueError(f"{self.granularity} quantization is dynamic: pass dynamic=True")
        self.dynamic = dynamic
        self.observer: Observer | None = None if dynamic else make_observer(observer, self.fmt, **(observer_kwargs or {}))
        self.mode = Mode.CALIBRATE
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    # -- what the verifier and provenance read ------------------------------------------------
    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def symmetric(self) -> bool:
        return self.fmt.symmetric

    @property
    def is_frozen(self) -> bool:
        return self.mode is Mode.QUANTIZE and (self.dynamic or self.scale is not None)

    def group_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as ``(n_groups, n)``: one row per (s, z) of this quantizer."""
        return self.granularity.view(t)

    def describe(self) -> dict[str, Any]:
        """Settings for provenance and reports."""
        info: dict[str, Any] = {
            "bits": self.bits,
            "format": str(self.fmt),
            "granularity": str(self.granularity),
            "dynamic": self.dynamic,
        }
        if self.observer is not None:
            info.update(self.observer.config())
        return info

    # -- lifecycle ------------------------------------------------------------------------------
    def set_mode(self, mode: "Mode | str") -> None:
        self.mode = Mode(mode)

    def observe(self, x: torch.Tensor) -> None:
        """Feed one tensor to the observer (no-op for dynamic quantizers)."""
        if self.observer is not None:
            self.observer.observe(self.group_view(x.detach()))

    def freeze(self) -> bool:
        """Fix (s, z) from the statistics and switch to ``quantize``; False if a static one saw no data.

        A static quantizer without statistics is left without (s, z): using it raises
        :class:`UncalibratedError` rather than silently passing float through.
        """
        self.mode = Mode.QUANTIZE
        if self.dynamic:
            return True
        if self.observer is None or not self.observer.has_data:
            return self.scale is not None
        scale, zero_point = self.observer.qparams()
        self.scale, self.zero_point = scale, zero_point
        self.observer.reset()
        return True

    # -- forward --------------------------------------------------------------------------------
    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (s, z) applied to ``x``: the frozen buffers, or computed from ``x`` when dynamic."""
        if self.dynamic:
            return minmax_qparams(x, self.fmt, self.granularity)
        if self.scale is None:
            raise UncalibratedError(f"static {self.extra_repr()} quantizer used before calibration")
        return self.scale, self.zero_point

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (the ``quantize``-mode forward)."""
        scale, zero_point = self.qparams_for(x)
        return fake_quantize_grouped(x, scale, zero_point, self.fmt, self.granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Mode.QUANTIZE:
            return self.quantize(x)
        if self.mode is Mode.CALIBRATE and not self.dynamic:
            self.observe(select_valid_tokens(x))
        return x

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return f"{self.fmt}, {self.granularity}, {kind}, mode={self.mode.value}"

    def cache_sources(self) -> tuple[Any, ...] | None:
        """What :meth:`quantize` reads besides its input, so a frozen weight's result can be reused; None: never.

        The base quantizer depends only on its format, granularity, kind and (s, z) buffers. A subclass that
        overrides :meth:`forward`, :meth:`quantize` or :meth:`qparams_for` may read anything, so it gets None
        unless it overrides this method too and lists what it reads (tensors are checked by identity,
        version, storage, device and dtype; other values by identity).
        """
        cls = type(self)
        if (
            cls.forward is not TensorQuantizer.forward
            or cls.quantize is not TensorQuantizer.quantize
            or cls.qparams_for is not TensorQuantizer.qparams_for
        ):
            return None
        return (self.fmt, self.granularity, self.dynamic, self.scale, self.zero_point)


QuantizerFactory = Callable[[str, nn.Module], "TensorQuantizer | None"]
"""``(qualified name, float module) -> quantizer`` (None: leave that tensor in float)."""


def make_weight_quantizer(
    bits: int, granularity: "str | Granularity" = "per_channel", *, symmetric: bool = True, **kwargs: Any
) -> TensorQuantizer:
    """A static weight quantizer; per-channel symmetric minmax unless told otherwise (§1.6)."""
    return TensorQuantizer(bits, symmetric=symmetric, granularity=granularity, **kwargs)


def make_activation_quantizer(
    bits: int,
    granularity: "str | Granularity" = "per_tensor",
    *,
    symmetric: bool = False,
    dynamic: bool | None = None,
    **kwargs: Any,
) -> TensorQuantizer | None:
    """An input-activation quantizer, per-tensor asymmetric static minmax by default (§1.6).

    Returns None at 16 bits and above: activations stay float (``w4a16``). ``dynamic`` defaults to what
    the granularity requires (per-token: dynamic; otherwise static).
    """
    if bits >= FLOAT_ACTIVATION_BITS:
        return None
    if dynamic is None:
        dynamic = Granularity.parse(granularity).dynamic_only
    return TensorQuantizer(bits, symmetric=symmetric, granularity=granularity, dynamic=dynamic, **kwargs)


# -- quantized Linear / Conv2d ---------------------------------------------------------------------
_WEIGHT_CACHES: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]]" = weakref.WeakKeyDictionary()
"""Each :class:`QuantModule`'s cached fake-quantized weight, ``(key, value, sources, storages)``, in a side table
rather than an attribute: nothing that walks a module's attributes (``state_dict``, checkpoints, feature-cache
fingerprints, ``copy.deepcopy``, pickling) ever sees it, and an entry goes when its module is collected."""


def _cache_key(items: Sequence[Any]) -> tuple[Any, ...] | None:
    """A comparable fingerprint of ``items``: tensors by (id, version, data pointer, device, dtype, shape),
    other values by id; None if a tensor has no version counter (an inference-mode tensor), so nothing is cached."""
    key: list[Any] = []
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.is_inference():
                return None
            key.append((id(item), item._version, item.data_ptr(), item.device, item.dtype, item.shape))
        else:
            key.append(id(item))
    return tuple(key)


def _global_module_hooks() -> bool:
    """Whether any global ``nn.Module`` forward hook is registered (then every quantizer call must run)."""
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


def drop_weight_caches(model: nn.Module) -> int:
    """Forget every cached fake-quantized weight below ``model`` (after editing weights through ``.data``);
    returns how many quantized modules were visited."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantModule):
            module.drop_weight_cache()
            count += 1
    return count


class QuantModule:
    """Mixin for a float module whose weight and input are fake-quantized before its float kernel.

    ``weight_quantizer`` is required; ``act_quantizer`` may be None (activations in float). In
    ``calibrate`` mode the weight passes in float (the weight is observed once, at :meth:`freeze`, after
    any transform a method applies to it).
    """

    weight_quantizer: TensorQuantizer
    act_quantizer: TensorQuantizer | None
    weight: nn.Parameter
    _float_type: type[nn.Module]

    @classmethod
    def from_float(
        cls, module: nn.Module, weight_quantizer: TensorQuantizer, act_quantizer: TensorQuantizer | None = None
    ) -> "QuantModule":
        """A quantized twin of ``module`` sharing its Parameters, buffers and settings (no copy of weights)."""
        base = cls._float_type
        if not isinstance(module, base) or isinstance(module, QuantModule):
            raise TypeError(f"{cls.__name__}.from_float needs a float {base.__name__}, got {type(module).__name__}")
        if type(module).forward is not base.forward:
            raise TypeError(
                f"cannot quantize {type(module).__name__}: it overrides {base.__name__}.forward, "
                "so replacing its kernel could change what it computes"
            )
        new = cls.__new__(cls)
        new.__dict__.update(_shallow_state(module))
        new.weight_quantizer = weight_quantizer
        new.register_module("act_quantizer", act_quantizer)
        return new

    def to_float(self) -> nn.Module:
        """The plain float module again, sharing this module's Parameters (quantizers dropped)."""
        plain = self._float_type.__new__(self._float_type)
        plain.__dict__.update(_shallow_state(self))
        for name in ("weight_quantizer", "act_quantizer"):
            plain._modules.pop(name, None)
        return plain

    def quantizers(self) -> Iterator[tuple[str, TensorQuantizer]]:
        yield "weight", self.weight_quantizer
        if self.act_quantizer is not None:
            yield "act", self.act_quantizer

    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake-quantized input and weight that the float kernel consumes.

        Without gradients, a frozen weight's fake-quantized value is reused while the weight and its
        quantizer's (s, z) are unchanged (:meth:`quantized_weight`).
        """
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        quantizer = self.weight_quantizer
        if quantizer.mode is Mode.CALIBRATE:
            return x, self.weight
        if quantizer.mode is Mode.QUANTIZE and not torch.is_grad_enabled() and fused_enabled():
            return x, self.quantized_weight()
        return x, quantizer(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        """``weight_quantizer(weight)``, computed once and reused until the weight or the quantizer changes.

        Why: a frozen quantizer maps an unchanged weight to the same tensor on every forward, and on small
        layers recomputing it is a large share of the cost. The value lives in a side table keyed by the
        module (:data:`_WEIGHT_CACHES`; not a parameter, buffer or attribute: it never enters ``state_dict``,
        checkpoints, feature-cache fingerprints or copies of the module) and is returned only if the weight
        Parameter and every tensor the quantizer reads (:meth:`TensorQuantizer.cache_sources`) are the same
        objects with the same version counter, storage, device and dtype as when it was computed — so an optimizer step, ``load_state_dict``, any in-place
        edit under ``torch.no_grad`` or a new (s, z) recomputes it. The entry keeps its source tensors
        alive, so their ids and storages cannot be reused by other tensors while it exists. Not detected:
        in-place edits through ``tensor.data`` (they bypass version counters); call :func:`drop_weight_caches`
        after such an edit. Quantizers with hooks, or that cannot list their sources, are called every time.
        """
        quantizer = self.weight_quantizer
        sources = quantizer.cache_sources()
        if sources is None or quantizer._forward_hooks or quantizer._forward_pre_hooks or _global_module_hooks():
            return quantizer(self.weight)
        weight = self.weight
        key = _cache_key((weight, quantizer, *sources))
        if key is None:
            return quantizer(self.weight)
        entry = _WEIGHT_CACHES.get(self)  # type: ignore[call-overload]
        if entry is not None and entry[0] == key:
            return entry[1]
        value = quantizer(weight)
        keep = tuple(item.detach() if isinstance(item, torch.Tensor) else item for item in (weight, quantizer, *sources))
        _WEIGHT_CACHES[self] = (key, value, (weight, quantizer, *sources), keep)  # type: ignore[index]
        return value

    def has_cached_weight(self) -> bool:
        """Whether a fake-quantized weight is cached for this module (valid or not; checked on use)."""
        return self in _WEIGHT_CACHES

    def drop_weight_cache(self) -> None:
        """Forget the cached fake-quantized weight (the next no-gradient forward recomputes it)."""
        _WEIGHT_CACHES.pop(self, None)  # type: ignore[call-overload]

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``nn.Module._apply`` (``.to()``, ``.half()``, ``.cuda()`` ...) after dropping the cached weight,
        which is on the old device or dtype and would only hold memory until the next forward."""
        self.drop_weight_cache()
        return super()._apply(fn, *args, **kwargs)  # type: ignore[misc]

    def freeze(self) -> list[str]:
        """Observe the current weight, fix every (s, z); returns the quantizers left without statistics."""
        missing = []
        if self.weight_quantizer.mode is Mode.CALIBRATE:
            self.weight_quantizer.observe(self.weight.detach())
        for role, quantizer in self.quantizers():
            if quantizer.mode is Mode.CALIBRATE and not quantizer.freeze():
                missing.append(role)
        return missing


class QuantLinear(QuantModule, nn.Linear):
    """``nn.Linear`` computing ``F.linear(Q_a(x), Q_w(W), b)``."""

    _float_type = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.quantized_operands(x)
        return F.linear(x, weight, self.bias)


class QuantConv2d(QuantModule, nn.Conv2d):
    """``nn.Conv2d`` computing its own convolution (stride, padding, dilation, groups) on ``Q_a(x)``, ``Q_w(W)``."""

    _float_type = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.quantized_operands(x)
        return self._conv_forward(x, weight, self.bias)


QUANT_MODULE_TYPES: tuple[type[QuantModule], ...] = (QuantLinear, QuantConv2d)


def wrap_module(
    module: nn.Module, weight_quantizer: TensorQuantizer, act_quantizer: TensorQuantizer | None = None
) -> QuantModule:
    """The quantized twin of a Linear or Conv2d."""
    for cls in QUANT_MODULE_TYPES:
        if isinstance(module, cls._float_type):
            return cls.from_float(module, weight_quantizer, act_quantizer)
    raise TypeError(f"no quantized version of {type(module).__name__} (Linear and Conv2d are supported)")


# -- attention rewrite -----------------------------------------------------------------------------
ATTENTION_SLOTS = ("q", "k", "v", "probs")


class QuantizableMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` with real ``nn.Linear`` projections and quantizer slots.

    Same call as ``nn.MultiheadAttention``: ``(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False) -> (out, weights | None)``, honouring the
    original ``batch_first`` and unbatched inputs. Masks: 2-D ``(L, S)`` or 3-D ``(N·heads, L, S)``
    attention masks and ``(N, S)`` key-padding masks, boolean (True = not allowed) or additive float.
    K and V are projected from ``key`` and ``value`` (cross-attention). ``q``, ``k``, ``v`` act on the
    per-head projections ``(N, heads, L, head_dim)``, ``probs`` on the softmax ``(N, heads, L, S)``; all are
    ``nn.Identity`` by default, when the module calls ``F.scaled_dot_product_attention``; once ``probs``
    holds a quantizer (or weights are requested) the softmax is materialised instead.
    ``add_bias_kv`` and ``add_zero_attn`` (unused by open_clip) are not supported.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        batch_first: bool = False,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias if out_bias is None else out_bias, **factory)
        for slot in ATTENTION_SLOTS:
            setattr(self, slot, nn.Identity())

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "QuantizableMultiheadAttention":
        """Copy the weights of a loaded ``nn.MultiheadAttention`` (fused or separate q/k/v projections)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("nn.MultiheadAttention with add_bias_kv/add_zero_attn cannot be rewritten")
        reference = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            bias=mha.in_proj_bias is not None,
            out_bias=mha.out_proj.bias is not None,
            batch_first=mha.batch_first,
            dropout=mha.dropout,
            device=reference.device,
            dtype=reference.dtype,
        )
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3, dim=0)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for linear, weight, bias in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = query if key is None else key
        value = key if value is None else value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, _ = query.shape
        source = key.shape[1]
        q = self.q(self._heads(self.q_proj(query)))
        k = self.k(self._heads(self.k_proj(key)))
        v = self.v(self._heads(self.v_proj(value)))
        mask = self._merged_mask(attn_mask, key_padding_mask, batch, length, source, q.dtype)
        causal = is_causal and mask is None
        out, weights = self._attend(q, k, v, mask, causal, need_weights)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        return out, weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, E)`` to ``(N, heads, L, head_dim)``."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _merged_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        batch: int,
        length: int,
        source: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """One additive float mask broadcastable to ``(N, heads, L, S)``, or None."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            mask = mask.view(1, 1, length, source) if mask.dim() == 2 else mask.view(batch, self.num_heads, length, source)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dropout = self.dropout if self.training else 0.0
        if isinstance(self.probs, nn.Identity) and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
            return out, None
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
        if causal:
            length, source = scores.shape[-2:]
            mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril().logical_not()
            mask = _additive(mask, scores.dtype)
        if mask is not None:
            scores = scores + mask
        probs = self.probs(scores.softmax(dim=-1))
        out = F.dropout(probs, p=dropout) @ v if dropout else probs @ v
        return out, probs if need_weights else None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = not allowed) as 0/−inf; a float mask cast to ``dtype``."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def rewrite_attention(module: nn.Module, where: Callable[[str], bool] | None = None) -> int:
    """Replace every ``nn.MultiheadAttention`` below ``module`` (whose name passes ``where``, if given) in
    place; returns how many were replaced.

    Run after the weights are loaded (the rewrite copies them). A module shared at several places is
    rewritten once and the copy placed at each of them.
    """
    if isinstance(module, nn.MultiheadAttention):
        raise ValueError("rewrite_attention replaces submodules; pass the module that contains the attention")
    replaced: dict[int, QuantizableMultiheadAttention] = {}
    targets = [
        (name, child)
        for name, child in module.named_modules(remove_duplicate=False)
        if isinstance(child, nn.MultiheadAttention) and (where is None or where(name))
    ]
    for name, child in targets:
        if id(child) not in replaced:
            replaced[id(child)] = QuantizableMultiheadAttention.from_float(child)
        _set_submodule(module, name, replaced[id(child)])
    return len(replaced)


# -- wrapping a VLM --------------------------------------------------------------------------------
def rewrite_tower_attention(vlm: VLM, towers: Sequence[str]) -> int:
    """Rewrite the attention modules of ``towers`` only, so a tower out of scope stays bit-identical to FP32
    (same modules, same kernels: its features and the feature-cache fingerprint are the FP32 ones)."""
    return rewrite_attention(vlm.model, where=lambda name: vlm.tower_of(name + ".") in towers)


def is_under(name: str, prefixes: "frozenset[str] | Sequence[str]") -> bool:
    """True when ``name`` is one of ``prefixes`` or a descendant (``prefix.``) of one."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def in_scope_modules(vlm: VLM, towers: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv2d modules a quantizer must quantize: those of ``towers``, heads and their children excluded."""
    return [(name, module) for name, module in vlm.quantizable_modules(towers) if not is_under(name, vlm.head_modules)]


def quantize_modules(
    vlm: VLM,
    towers: Sequence[str],
    weight_factory: QuantizerFactory,
    act_factory: QuantizerFactory,
) -> dict[str, QuantModule]:
    """Replace every in-scope Linear/Conv2d by its quantized twin; returns ``{name inside vlm.model: module}``.

    ``weight_factory(name, module)`` must return a quantizer; ``act_factory`` may return None to keep that
    module's input in float. Refuses to run while an ``nn.MultiheadAttention`` remains in scope (its
    projections would never run through the wrappers): call :func:`rewrite_attention` first.
    """
    leftover = [
        name
        for name, module in vlm.model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and vlm.tower_of(name) in towers
    ]
    if leftover:
        raise ValueError(f"nn.MultiheadAttention still in scope ({leftover[0]}, ...): call rewrite_attention first")
    wrapped: dict[str, QuantModule] = {}
    for name, module in in_scope_modules(vlm, towers):
        if isinstance(module, QuantModule):
            raise ValueError(f"{name} is already quantized")
        weight = weight_factory(name, module)
        if weight is None:
            raise ValueError(f"the weight factory returned no quantizer for {name}")
        new = wrap_module(module, weight, act_factory(name, module))
        _set_submodule(vlm.model, name, new)
        wrapped[name] = new
    return wrapped


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    """Every quantized Linear/Conv2d below ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            yield name, module


def tensor_quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """Every :class:`TensorQuantizer` below ``model`` (module weights/inputs and attention slots)."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


@contextmanager
def eval_mode(root: nn.Module) -> Iterator[None]:
    """``root`` and everything below it in eval mode for the duration; afterwards every module gets its *own*
    previous mode back (``root.train(flag)`` would impose the root's flag on all children: a VLM wrapper left
    in training mode would switch the loaded model's dropout and adaptive quantizers on)."""
    modes = [(module, module.training) for module in root.modules()]
    root.eval()
    try:
        yield
    finally:
        for module, flag in modes:
            module.training = flag


def set_quantizer_mode(model: nn.Module, mode: "Mode | str") -> int:
    """Put every tensor quantizer below ``model`` in ``mode``; returns how many."""
    count = 0
    for _, quantizer in tensor_quantizers(model):
        quantizer.set_mode(mode)
        count += 1
    return count


def _shallow_state(module: nn.Module) -> dict[str, Any]:
    """A module's attributes with its containers (parameter/buffer/module/hook dicts) copied, values shared."""
    return {key: (value.copy() if isinstance(value, (dict, set, list)) else value) for key, value in module.__dict__.items()}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def layout_counts(vlm: VLM, wrapped: dict[str, QuantModule], rewritten: int) -> dict[str, Any]:
    """The provenance every quantizer records about its layout: attention rewrites and quantized modules per tower."""
    from collections import Counter

    return {
        "attention_modules_rewritten": rewritten,
        "quantized_modules": len(wrapped),
        "quantized_modules_by_tower": dict(Counter(vlm.tower_of(name) for name in wrapped)),
    }


def first_module_settings(wrapped: dict[str, QuantModule]) -> dict[str, Any]:
    """Weight and input quantizer settings of the first quantized module, as provenance records them."""
    first = next(iter(wrapped.values()), None)
    return {
        "weights": first.weight_quantizer.describe() if first is not None else None,
        "activations": (
            first.act_quantizer.describe() if first is not None and first.act_quantizer is not None else "float"
        ),
    }
