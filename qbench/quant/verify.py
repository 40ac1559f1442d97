"""Verification that a fake-quantized model really computes on at most 2^b values (``quantizers.md`` §1.9).

:func:`verify_quantized` runs one batch through the towers in scope and looks at what each quantized
module's *float kernel consumes*: a :class:`~torch.overrides.TorchFunctionMode` intercepts every
``F.linear``/``F.conv2d`` call issued while a quantized module's forward is on the stack and inspects its
``input`` and ``weight`` arguments. Inspecting the kernel's arguments (rather than a quantizer's output)
catches a module that computes Q(W) and then forgets to use it. For each tensor, with its quantizer's
bits b and group view, ``u = max over groups of |unique(group)|``. The model passes iff

* every quantized tensor has ``2 ≤ u ≤ 2^b`` (u = 1 everywhere would mean a collapsed or bypassed
  quantizer, u > 2^b a float tensor) and every quantizer is frozen in ``quantize`` mode;
* every in-scope module (Linear/Conv2d of the towers in scope, heads excluded, ``models.md`` §6) carries
  a quantizer and ran at least once, its kernel seen;
* no head module and no out-of-scope module carries a quantizer.

Attention-slot quantizers (``q``, ``k``, ``v``, ``probs`` of the rewritten attention) are checked on their
outputs, which the attention matmuls consume directly. ``float_extras`` (modules a method adds in float
by design, e.g. QwT compensation) are listed and excluded. Activations at 16 bits are float: recorded as
not quantized (``act_bits`` 16, ``act_max_unique`` None), not a failure.

Baselines: with ``expect_quantized=False`` (the ``fp32`` baseline) a model with nothing quantized passes
with ``n_modules == 0``; a quantizer found anyway is still checked. With ``expect_quantized=True`` (every
other method) an in-scope module without a quantizer, or nothing quantized at all, fails.

Contract for method authors: a quantized module is a :class:`~qbench.quant.modules.QuantModule` whose
forward calls ``F.linear``/``F.conv2d`` (directly or through ``Conv2d._conv_forward``) on the tensors it
quantized, and whose quantizers expose ``bits``, ``granularity``, ``mode`` and ``group_view``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from qbench.model import VLM
from qbench.quant.fake_quant import count_unique_per_group
from qbench.quant.modules import (
    ATTENTION_SLOTS,
    Mode,
    QuantizableMultiheadAttention,
    QuantModule,
    TensorQuantizer,
    in_scope_modules,
    is_under,
    tensor_quantizers,
)
from qbench.quant.spec import FLOAT_ACTIVATION_BITS

_KERNELS = frozenset({F.linear, F.conv2d})


@dataclass(frozen=True)
class ModuleCheck:
    """What one quantized module (or attention slot) consumed on the verification batch.

    ``weight_*`` are None for attention slots; ``act_bits`` is 16 and ``act_max_unique`` None when the
    input stays in float. ``calls`` counts forward calls, ``fired`` is ``calls > 0``.
    """

    name: str
    tower: str | None
    kind: str
    weight_bits: int | None
    weight_max_unique: int | None
    weight_granularity: str | None
    act_bits: int
    act_max_unique: int | None
    act_granularity: str
    fired: bool
    calls: int


@dataclass(frozen=True)
class VerificationReport:
    """Result of :func:`verify_quantized`; ``to_dict()`` is the JSON form stored with every result."""

    passed: bool
    n_modules: int
    modules: tuple[ModuleCheck, ...]
    float_extras: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    slots: tuple[ModuleCheck, ...] = ()
    towers: tuple[str, ...] = ()
    expect_quantized: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "n_modules": self.n_modules,
            "towers": list(self.towers),
            "expect_quantized": self.expect_quantized,
            "modules": [asdict(check) for check in self.modules],
            "slots": [asdict(check) for check in self.slots],
            "float_extras": dict(self.float_extras),
            "problems": list(self.problems),
        }


@dataclass
class _Seen:
    """Running maxima of distinct values per tensor role, over calls."""

    calls: int = 0
    kernel_calls: int = 0
    unique: dict[str, int] = field(default_factory=dict)

    def update(self, role: str, quantizer: TensorQuantizer, tensor: torch.Tensor) -> None:
        u = int(count_unique_per_group(quantizer.group_view(tensor.detach())).max())
        self.unique[role] = max(self.unique.get(role, 0), u)


class _KernelRecorder(TorchFunctionMode):
    """Records the arguments of every linear/conv2d kernel issued inside a watched quantized module."""

    def __init__(self, modules: Mapping[str, QuantModule]) -> None:
        super().__init__()
        self.modules = modules
        self.seen = {name: _Seen() for name in modules}
        self.stack: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack and func in _KERNELS:
            self._record(self.stack[-1], args, kwargs)
        return func(*args, **kwargs)

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        x = args[0] if len(args) > 0 else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        module, seen = self.modules[name], self.seen[name]
        seen.kernel_calls += 1
        seen.update("weight", module.weight_quantizer, weight)
        if module.act_quantizer is not None:
            seen.update("act", module.act_quantizer, x)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Forward pre/post hooks that keep :attr:`stack` on the quantized module currently running."""
        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(self._enter(name)))
            handles.append(module.register_forward_hook(self._leave(name)))
        try:
            with self:
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, name: str):
        def hook(module, inputs):
            self.stack.append(name)
            self.seen[name].calls += 1

        return hook

    def _leave(self, name: str):
        def hook(module, inputs, output):
            self.stack.pop()

        return hook


def verify_quantized(
    vlm: VLM,
    images: torch.Tensor,
    tokens: torch.Tensor | None,
    towers: Sequence[str],
    *,
    float_extras: Mapping[str, str] | None = None,
    expect_quantized: bool = True,
) -> VerificationReport:
    """Check the at-most-2^b-values property of every quantized module on one batch (see module doc).

    ``images`` are preprocessed pixels; ``tokens`` exercise the text tower and are required when
    ``"text"`` is in ``towers`` (they are not run otherwise). Runs without gradients and leaves the
    model as it found it (hooks removed).
    """
    towers = tuple(towers)
    extras = dict(float_extras or {})
    problems: list[str] = []
    targets = [(name, module) for name, module in in_scope_modules(vlm, towers) if not is_under(name, extras)]
    quantized = {name: module for name, module in targets if isinstance(module, QuantModule)}
    if expect_quantized:
        problems += [f"{name}: in scope but carries no quantizer" for name, module in targets if name not in quantized]
        if not targets:
            problems.append(f"no quantizable module found in towers {', '.join(towers)}")
    problems += _misplaced_quantizers(vlm, towers, extras)
    slots = _attention_slots(vlm, towers, extras)

    recorder = _KernelRecorder(quantized)
    slot_seen = {name: _Seen() for name in slots}
    with ExitStack() as stack, torch.no_grad():
        for name, quantizer in slots.items():
            stack.callback(quantizer.register_forward_hook(_slot_hook(slot_seen[name], quantizer)).remove)
        stack.enter_context(recorder.watching())
        vlm.encode_image(images)
        if "text" in towers:
            if tokens is None:
                problems.append("text tower in scope but no tokens were given to exercise it")
            else:
                vlm.encode_text(tokens)

    modules = tuple(_module_check(vlm, name, module, recorder.seen[name], problems) for name, module in quantized.items())
    slot_checks = tuple(_slot_check(vlm, name, quantizer, slot_seen[name], problems) for name, quantizer in slots.items())
    return VerificationReport(
        passed=not problems,
        n_modules=len(modules),
        modules=modules,
        float_extras=extras,
        problems=tuple(problems),
        slots=slot_checks,
        towers=towers,
        expect_quantized=expect_quantized,
    )


# -- helpers ---------------------------------------------------------------------------------------
def _misplaced_quantizers(vlm: VLM, towers: Sequence[str], extras: Mapping[str, str]) -> list[str]:
    """One problem per head or out-of-scope module that carries a quantizer."""
    problems, reported = [], set()
    for name, _ in tensor_quantizers(vlm.model):
        owner = name.rpartition(".")[0]
        if owner in reported or is_under(owner, extras):
            continue
        if is_under(owner, vlm.head_modules):
            problems.append(f"{owner}: head module carries a quantizer (heads stay float)")
        elif vlm.tower_of(name) not in towers:
            problems.append(f"{owner}: out-of-scope module carries a quantizer (scope: {', '.join(towers)})")
        else:
            continue
        reported.add(owner)
    return problems


def _attention_slots(vlm: VLM, towers: Sequence[str], extras: Mapping[str, str]) -> dict[str, TensorQuantizer]:
    """Quantizers installed in the ``q``/``k``/``v``/``probs`` slots of in-scope rewritten attention."""
    slots = {}
    for name, module in vlm.model.named_modules():
        if not isinstance(module, QuantizableMultiheadAttention) or vlm.tower_of(name) not in towers:
            continue
        if is_under(name, vlm.head_modules) or is_under(name, extras):
            continue
        for slot in ATTENTION_SLOTS:
            quantizer = getattr(module, slot)
            if isinstance(quantizer, TensorQuantizer):
                slots[f"{name}.{slot}"] = quantizer
    return slots


def _slot_hook(seen: _Seen, quantizer: TensorQuantizer):
    def hook(module, inputs, output):
        seen.calls += 1
        seen.kernel_calls += 1
        seen.update("act", quantizer, output)

    return hook


def _check_tensor(
    name: str, role: str, quantizer: TensorQuantizer, unique: int | None, problems: list[str]
) -> None:
    if quantizer.mode is not Mode.QUANTIZE:
        problems.append(f"{name}: {role} quantizer is in '{quantizer.mode.value}' mode, not 'quantize'")
    if unique is None:
        return
    limit = 2**quantizer.bits
    if unique > limit:
        problems.append(f"{name}: {role} has {unique} distinct values in a group, more than 2^{quantizer.bits} = {limit}")
    elif unique < 2:
        problems.append(f"{name}: every group of its {role} holds a single value (collapsed or bypassed quantizer)")


def _module_check(vlm: VLM, name: str, module: QuantModule, seen: _Seen, problems: list[str]) -> ModuleCheck:
    if seen.calls == 0:
        problems.append(f"{name}: never ran on the verification batch")
    elif seen.kernel_calls == 0:
        problems.append(f"{name}: ran but never called F.linear/F.conv2d, so what it consumes could not be checked")
    weight_q, act_q = module.weight_quantizer, module.act_quantizer
    _check_tensor(name, "weight", weight_q, seen.unique.get("weight"), problems)
    if act_q is not None:
        _check_tensor(name, "input", act_q, seen.unique.get("act"), problems)
    return ModuleCheck(
        name=name,
        tower=vlm.tower_of(name),
        kind=type(module)._float_type.__name__,
        weight_bits=weight_q.bits,
        weight_max_unique=seen.unique.get("weight"),
        weight_granularity=str(weight_q.granularity),
        act_bits=act_q.bits if act_q is not None else FLOAT_ACTIVATION_BITS,
        act_max_unique=seen.unique.get("act") if act_q is not None else None,
        act_granularity=str(act_q.granularity) if act_q is not None else "float",
        fired=seen.calls > 0,
        calls=seen.calls,
    )


def _slot_check(vlm: VLM, name: str, quantizer: TensorQuantizer, seen: _Seen, problems: list[str]) -> ModuleCheck:
    if seen.calls == 0:
        problems.append(f"{name}: attention slot quantizer never ran on the verification batch")
    _check_tensor(name, "output", quantizer, seen.unique.get("act"), problems)
    return ModuleCheck(
        name=name,
        tower=vlm.tower_of(name),
        kind="attention-slot",
        weight_bits=None,
        weight_max_unique=None,
        weight_granularity=None,
        act_bits=quantizer.bits,
        act_max_unique=seen.unique.get("act"),
        act_granularity=str(quantizer.granularity),
        fired=seen.calls > 0,
        calls=seen.calls,
    )
