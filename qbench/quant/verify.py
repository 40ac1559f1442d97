"""Verification that a fake-quantized model really computes on at most 2^b values (``quantizers.md`` §1.9).

:func:`verify_quantized` runs one batch through the towers in scope and looks at what the *kernels consume*:
a :class:`~torch.overrides.TorchFunctionMode` intercepts every linear/conv/matmul-family kernel (``F.linear``,
``F.conv*``, ``torch.matmul``/``@``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``einsum``,
``F.scaled_dot_product_attention``, …) issued while a quantized module or a watched attention is running,
and inspects the arguments *as passed*, never a module's attributes or what its quantizer reports. So a
module that computes Q(W) and then forgets to use it, or adds a float side computation, is caught.

**Against the run, not the quantizer's word.** Given the run's bit spec (``bits``) and its quantizer, every
tensor is held to a :class:`~qbench.quant.layout.TensorRule` of the run's
:class:`~qbench.quant.layout.VerificationPlan`: bits from the spec (a method's documented exception — the
first-layer bits of Q-ViT — comes from its config through :class:`~qbench.quant.layout.QuantLayout`, and
only the core decides which modules are first layers), groups cut by the core's
:class:`~qbench.quant.layout.Grouping` chosen by the configuration, with core-enforced minimum sizes. A
quantizer's ``group_view`` is never used. A tensor passes iff

* no group holds more than 2^b distinct values (instance groups: also ≤ G·2^b in the whole tensor), and at
  least one group holds two (a single value everywhere is a collapsed or bypassed quantizer);
* the values of each group lie on a b-bit level set: uniform groups span at most 2^b − 1 of their smallest
  gap (a necessary condition of an affine grid; random float values span ~n² gaps, so groups smaller than
  2^b elements are still caught), log2 groups (APQ-ViT MPQ) are 0 or ``s·2^−k`` with k within 2^b − 2;
* the values are finite.

Per module the declared quantizers must match the plan too: weight/input quantizer bits equal to the rule's,
an input quantizer present iff the spec quantizes activations, every quantizer frozen in ``quantize`` mode.
Further: every in-scope module (Linear/Conv2d of the towers in scope, heads excluded, ``models.md`` §6)
carries a quantizer, ran and called a linear/conv kernel; a quantized module calls no other kernel (its
operands could not be attributed); no head or out-of-scope module carries a quantizer.

**Attention slots** (``q``, ``k``, ``v``, ``probs`` of the rewritten attention) are checked on the operands
of the attention's own matmuls: ``F.scaled_dot_product_attention(q, k, v)``, or ``(q·c) @ kᵀ`` then
``probs @ v`` when the softmax is materialised. Slots the layout declares must hold a quantizer; a slot
quantizer the layout does not declare is still held to A bits per tensor.

``float_extras`` (modules a method adds in float by design, e.g. QwT compensation, online Hadamards, IRM) are
listed and excluded: kernels they issue are ignored. Without a bit spec (``bits=None``, unit tests of a model
in isolation) the verifier runs in *declared* mode: each quantizer's own bits and its granularity mapped to a
core grouping, count check only; the report's ``expected`` is then null, and runs never use it.

Baselines: with ``expect_quantized=False`` (the ``fp32`` baseline) a model with nothing quantized passes
with ``n_modules == 0``; a quantizer found anyway is still checked. With ``expect_quantized=True`` (every
other method) an in-scope module without a quantizer, or nothing quantized at all, fails.

**Where the batch comes from.** :func:`verify_quantized` runs its own passes (``qbench quantize`` verifies on
proxy pairs); :class:`VerificationSession` is the same verification around passes that run anyway: ``qbench
eval`` records on the quantized state's first evaluation pass and first class-prompt pass
(:class:`qbench.engine.evaluate.RunVerification`), so verifying costs no extra forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from qbench.model import VLM
from qbench.quant.layout import (
    CONV_INPUT,
    LINEAR_INPUT,
    SLOT,
    WEIGHT,
    QuantLayout,
    TensorRule,
    VerificationPlan,
    declared_grouping,
    verification_plan,
)
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
from qbench.quant.spec import FLOAT_ACTIVATION_BITS, BitSpec

GRID_ULPS = 4
"""Rounding slack of the grid check, in units of the tensor dtype's epsilon times the group's magnitude (its
largest |value| plus 2^b smallest gaps, which bounds ``|q·s|`` before an offset is added): fake quantization
computes ``s·(q − z)`` (or ``q·s + β``) with one or two roundings, so real grids stay within it, while float
values miss it by orders of magnitude."""

LOG2_TOLERANCE = 1e-3
"""How far (in powers of two) a log2-grid value may sit from an exact ``s·2^−k``: MPQ computes ``s·2^−k``
exactly for normal numbers, so any float value is caught; subnormals are ignored."""


def _kernel_table() -> dict[Any, str]:
    """Every intercepted kernel and its operand layout (``linear``, ``conv``, ``matmul``, ``rmatmul``,
    ``addmm``, ``sdpa``, ``other`` = a product whose operands cannot be attributed)."""
    table: dict[Any, str] = {}

    def add(kind: str, *functions: Any) -> None:
        for function in functions:
            if function is not None:
                table[function] = kind

    add("linear", F.linear)
    add("conv", F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
    for name in ("matmul", "mm", "bmm", "mv", "dot", "inner", "vdot"):
        add("matmul", getattr(torch, name, None), getattr(torch.Tensor, name, None))
    add("matmul", torch.Tensor.__matmul__)
    add("rmatmul", torch.Tensor.__rmatmul__)
    for name in ("addmm", "baddbmm", "addbmm", "addmv"):
        add("addmm", getattr(torch, name, None), getattr(torch.Tensor, name, None), getattr(torch.Tensor, name + "_", None))
    add("sdpa", F.scaled_dot_product_attention)
    add("other", torch.einsum, torch.tensordot, torch.outer, torch.kron, F.bilinear, torch.chain_matmul,
        torch.linalg.multi_dot, getattr(torch.linalg, "matmul", None), getattr(torch.linalg, "vecdot", None))
    return table


_KERNELS = _kernel_table()


@dataclass(frozen=True)
class ModuleCheck:
    """What one quantized module (or attention slot) consumed on the verification batch.

    ``weight_bits``/``act_bits`` and ``*_granularity`` are what the module's quantizers *declare*
    (``act_bits`` 16 and ``act_granularity`` "float" when it has no input quantizer); ``expected_*_bits`` are
    what the run's bit spec requires (None in declared mode; ``expected_act_bits`` 16 when inputs stay
    float). ``*_grouping`` is the core grouping the values were counted by; ``*_max_unique`` the most distinct
    values in one group, ``*_min_group`` the element count of the smallest group, ``*_grid_steps`` the most
    grid steps one group spans (uniform: span / smallest gap, log2: exponent range; None when no grid is
    checked). ``weight_*`` are None for attention slots. ``calls`` counts forward calls (slots: kernel
    operands seen), ``fired`` is ``calls > 0``.
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
    expected_weight_bits: int | None = None
    expected_act_bits: int | None = None
    weight_grouping: str | None = None
    act_grouping: str = "float"
    weight_min_group: int | None = None
    act_min_group: int | None = None
    weight_grid_steps: float | None = None
    act_grid_steps: float | None = None


@dataclass(frozen=True)
class VerificationReport:
    """Result of :func:`verify_quantized`; ``to_dict()`` is the JSON form stored with every result.

    ``expected`` is the run's plan (:meth:`~qbench.quant.layout.VerificationPlan.to_dict`), None in declared mode.
    """

    passed: bool
    n_modules: int
    modules: tuple[ModuleCheck, ...]
    float_extras: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    slots: tuple[ModuleCheck, ...] = ()
    towers: tuple[str, ...] = ()
    expect_quantized: bool = True
    expected: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "n_modules": self.n_modules,
            "towers": list(self.towers),
            "expect_quantized": self.expect_quantized,
            "expected": self.expected,
            "modules": [asdict(check) for check in self.modules],
            "slots": [asdict(check) for check in self.slots],
            "float_extras": dict(self.float_extras),
            "problems": list(self.problems),
        }


# -- measuring one tensor --------------------------------------------------------------------------
SAMPLE_ELEMENTS = 1 << 12
"""Most elements of one consumed activation whose values are examined (:func:`_sampled_groups`).

Counting distinct values sorts or hashes every element: on a ViT-B/32 at 224 px the ~150 tensors of one 32-image
pass took about 6 plain forward passes to examine in full, more than the rest of a short evaluation. A fixed-seed
sample of 2^12 elements per tensor (whole groups when a tensor has several) keeps every check's power against what it
exists to catch — a float operand has thousands of distinct values in any such sample, a b-bit one never more than
2^b — at a cost of a few milliseconds per tensor. The group width used for the minimum-group-size check is the
tensor's own, not the sample's."""
WEIGHT_SAMPLE_ELEMENTS = 1 << 16
"""The same budget for weights: larger, because a weight is examined once per pass whatever the batch size, and so
that per-channel weights keep many whole rows (every row of the toy model's, 85 of a ViT-B/32 layer's 768)."""


def _sampled_groups(groups: torch.Tensor, budget: int = SAMPLE_ELEMENTS) -> torch.Tensor:
    """At most ``budget`` elements of ``groups`` (rows = groups), chosen by a fixed seed.

    One group (per-tensor): that many elements drawn uniformly (with a fixed generator, so a report is reproducible
    and no channel period can hide from a stride). Several groups: whole groups drawn the same way, so each kept
    group keeps every value. Tensors within the budget are returned unchanged."""
    rows, width = groups.shape
    if rows * width <= budget:
        return groups
    generator = torch.Generator().manual_seed(0)
    if rows == 1 or width >= budget:
        columns = torch.randint(0, width, (max(2, budget // rows),), generator=generator).to(groups.device)
        return groups[:, columns]
    keep = torch.randperm(rows, generator=generator)[:max(1, budget // width)].to(groups.device)
    return groups[keep]

@dataclass
class _Stats:
    """What one tensor role showed over every kernel call: the worst group of any call."""

    observed: int = 0
    max_unique: int = 0
    tensor_unique: int = 0
    min_group: int | None = None
    grid_steps: float | None = None
    off_grid: bool = False
    nonfinite: bool = False
    error: str | None = None

    def add(self, tensor: torch.Tensor, rule: TensorRule) -> None:
        """Fold one consumed tensor into the running worst case (grouped by ``rule``)."""
        self.observed += 1
        t = tensor.detach()
        if not _all_finite(t):
            self.nonfinite = True
            return
        try:
            groups = rule.grouping.view(t, rule.context)
        except (ValueError, RuntimeError) as error:
            self.error = str(error).splitlines()[0]
            return
        if groups.numel() == 0:
            return
        width = groups.shape[1]
        groups = _sampled_groups(groups, WEIGHT_SAMPLE_ELEMENTS if rule.context == WEIGHT else SAMPLE_ELEMENTS)
        work = groups.to(torch.float64 if groups.dtype == torch.float64 else torch.float32)
        ordered, values = _distinct_rows(work)
        diffs = ordered[:, 1:] - ordered[:, :-1]
        distinct = diffs > 0
        self.max_unique = max(self.max_unique, int(1 + distinct.sum(dim=1).max()) if diffs.numel() else 1)
        self.min_group = width if self.min_group is None else min(self.min_group, width)
        levels = rule.grouping.tensor_levels(rule.bits)
        if levels is not None:
            self.tensor_unique = max(self.tensor_unique, int(torch.unique(values).numel()))
        if rule.grid and diffs.numel():
            eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0, torch.finfo(work.dtype).eps)
            steps, off = (_log2_steps(ordered, t.dtype) if rule.grouping.grid == "log2"
                          else (_uniform_steps(ordered, diffs, distinct, eps, rule.levels), False))
            self.grid_steps = steps if self.grid_steps is None else max(self.grid_steps, steps)
            self.off_grid = self.off_grid or off


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite: its min and max are (``aminmax`` propagates NaN, and an infinity
    is the min or the max). One reduction instead of a full-size boolean tensor: ``isfinite(t).all()`` over the
    ~150 operands of one ViT-B/32 pass took about half of the verification's own time."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _distinct_rows(work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ordered, values)``: the rows of ``work`` (finite floats) in ascending order, and every value of a row
    (flat, unordered, duplicates allowed).

    A single row (per-tensor groups: the large activation tensors) is first reduced to its distinct values: the
    checks below depend only on the set of values of each group (counts, span, smallest gap, grid exponents), and
    a quantized tensor holds at most 2^b of them, so sorting those few instead of every element (the old
    ``work.sort(dim=1)``) gives the same results about 3x faster (a hash-based ``torch.unique`` on the float32
    bits). Distinct means unequal as numbers: ``-0.0`` is keyed as ``0.0`` (``+ 0.0``), as ``sort`` followed by
    ``diff > 0`` counts it; a row of one repeated value stays two wide, so the checks see its zero gap as before.
    Several rows (per-channel or per-token groups) and float64 are sorted whole, which measured faster than keying
    every element by its row.
    """
    if work.dtype != torch.float32 or work.shape[0] != 1 or work.shape[1] <= 1:
        ordered = work.sort(dim=1).values
        return ordered, ordered.reshape(-1)
    bits = (work + 0.0).view(torch.int32)  # + 0.0: -0.0 -> 0.0, every other finite value unchanged
    values = torch.unique(bits.reshape(-1), sorted=False).view(torch.float32)
    ordered = values.sort().values if values.numel() > 1 else values.repeat(2)  # a constant row keeps one (zero) gap
    return ordered.unsqueeze(0), values


def _uniform_steps(ordered: torch.Tensor, diffs: torch.Tensor, distinct: torch.Tensor, eps: float, levels: int) -> float:
    """Most grid steps a group spans: ``(span − 2δ) / (smallest gap + 2δ)``, δ the rounding slack (:data:`GRID_ULPS`).

    On a b-bit affine grid ``s·(q − z)`` this is at most 2^b − 1; a float group's smallest gap is tiny
    next to its span, so the ratio is far above it. Groups with fewer than three values span at most one gap.
    """
    gap = torch.where(distinct, diffs, torch.full_like(diffs, math.inf)).amin(dim=1)
    several = distinct.sum(dim=1) >= 2
    if not bool(several.any()):
        return 1.0 if bool(distinct.any()) else 0.0
    ordered, gap = ordered[several], gap[several]
    span = ordered[:, -1] - ordered[:, 0]
    delta = GRID_ULPS * eps * (ordered.abs().amax(dim=1) + levels * gap)
    steps = (span - 2 * delta).clamp(min=0) / (gap + 2 * delta)
    return round(float(steps.max()), 4)


def _log2_steps(ordered: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    """Exponent range of the normal positive values of each group below its largest, and whether any value is
    off the levels ``{0} ∪ {s·2^−k}`` (negative, or not a power of two below the group's largest)."""
    if bool((ordered < 0).any()):
        return 0.0, True
    tiny = torch.finfo(dtype).tiny if dtype.is_floating_point else 0.0
    top = ordered[:, -1:].clamp(min=tiny)
    normal = ordered >= tiny
    exponents = torch.log2(torch.where(normal, ordered, top) / top)
    off = bool(((exponents - exponents.round()).abs() > LOG2_TOLERANCE).any())
    return float((-exponents.round()).max()), off


# -- the kernel recorder ---------------------------------------------------------------------------
@dataclass
class _Frame:
    """One watched module on the call stack: a quantized module, an attention with slots, or a float extra."""

    owner: str | None
    kind: str
    matmuls: int = 0


class _KernelRecorder(TorchFunctionMode):
    """Records the operands of every kernel issued while a watched module is the innermost watched frame.

    ``rules[owner][role]`` says how to group each operand (roles ``weight``/``input`` of a quantized module,
    ``q``/``k``/``v``/``probs`` of an attention); a role without a rule is not measured. Kernels issued inside a
    float extra are ignored; kernels a quantized module or a watched attention issues that cannot be
    attributed to its operands are recorded in :attr:`unattributed`.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        attentions: Mapping[str, nn.Module],
        neutral: Sequence[nn.Module],
        rules: Mapping[str, Mapping[str, TensorRule | None]],
    ) -> None:
        super().__init__()
        self.modules, self.attentions, self.neutral, self.rules = modules, attentions, neutral, rules
        self.stats: dict[tuple[str, str], _Stats] = {}
        self.calls: dict[str, int] = {}
        self.kernel_calls: dict[str, int] = {}
        self.unattributed: dict[str, str] = {}
        self.stack: list[_Frame] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _KERNELS.get(func)
        if kind is not None and self.stack and self.stack[-1].owner is not None:
            self._record(self.stack[-1], kind, func, args, kwargs)
        return func(*args, **kwargs)

    def stats_of(self, owner: str, role: str) -> _Stats:
        return self.stats.setdefault((owner, role), _Stats())

    def _observe(self, owner: str, role: str, tensor: Any) -> None:
        rule = self.rules.get(owner, {}).get(role)
        if rule is not None and isinstance(tensor, torch.Tensor):
            self.stats_of(owner, role).add(tensor, rule)

    def _record(self, frame: _Frame, kind: str, func: Any, args: tuple, kwargs: dict) -> None:
        owner = frame.owner
        assert owner is not None
        self.kernel_calls[owner] = self.kernel_calls.get(owner, 0) + 1
        if frame.kind == "module":
            if kind in ("linear", "conv"):
                self._observe(owner, "weight", _arg(args, kwargs, 1, "weight"))
                self._observe(owner, "input", _arg(args, kwargs, 0, "input"))
            else:
                self.unattributed.setdefault(owner, _name(func))
            return
        operands = _operands(kind, args, kwargs)
        if kind == "sdpa" and operands is not None:
            for slot, tensor in zip(("q", "k", "v"), operands):
                self._observe(owner, slot, tensor)
            frame.matmuls += 2
        elif operands is not None and len(operands) == 2 and frame.matmuls < 2:
            a, b = operands
            if frame.matmuls == 0:
                self._observe(owner, "q", a)
                self._observe(owner, "k", b.transpose(-2, -1) if isinstance(b, torch.Tensor) and b.dim() >= 2 else b)
            else:
                self._observe(owner, "probs", a)
                self._observe(owner, "v", b)
            frame.matmuls += 1
        else:
            self.unattributed.setdefault(owner, _name(func))

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Frames for the watched modules, pushed before any of their own pre-hooks run and popped after their
        own forward hooks (so a hook that computes on the side is inside the frame), then the mode itself."""
        handles = []
        frames = [(module, name, "module") for name, module in self.modules.items()]
        frames += [(module, name, "attention") for name, module in self.attentions.items()]
        frames += [(module, None, "neutral") for module in self.neutral]
        for module, name, kind in frames:
            handles.append(module.register_forward_pre_hook(self._enter(name, kind), prepend=True))
            handles.append(module.register_forward_hook(self._leave()))
        try:
            with self:
                yield
        finally:
            for handle in handles:
                handle.remove()
            self.stack.clear()

    def _enter(self, name: str | None, kind: str):
        def hook(module, inputs):
            self.stack.append(_Frame(name, kind))
            if name is not None:
                self.calls[name] = self.calls.get(name, 0) + 1

        return hook

    def _leave(self):
        def hook(module, inputs, output):
            if self.stack:
                self.stack.pop()

        return hook


def _arg(args: tuple, kwargs: dict, index: int, key: str) -> Any:
    """Positional argument ``index`` or keyword ``key`` of a kernel call (None if absent)."""
    return args[index] if len(args) > index else kwargs.get(key)


def _operands(kind: str, args: tuple, kwargs: dict) -> tuple[Any, ...] | None:
    """The product operands of a matmul-family or SDPA call, in ``a @ b`` order (None: not attributable)."""
    if kind == "matmul":
        return (_arg(args, kwargs, 0, "input"), args[1] if len(args) > 1 else next(
            (kwargs[key] for key in ("other", "mat2", "vec", "tensor") if key in kwargs), None))
    if kind == "rmatmul":
        return (_arg(args, kwargs, 1, "other"), args[0] if args else None)
    if kind == "addmm":
        first = args[1] if len(args) > 1 else next((kwargs[k] for k in ("mat1", "batch1", "mat") if k in kwargs), None)
        second = args[2] if len(args) > 2 else next((kwargs[k] for k in ("mat2", "batch2", "vec") if k in kwargs), None)
        return (first, second)
    if kind == "sdpa":
        return (_arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key"), _arg(args, kwargs, 2, "value"))
    return None


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or repr(func)


# -- the verifier ----------------------------------------------------------------------------------
def verify_quantized(
    vlm: VLM,
    images: torch.Tensor,
    tokens: torch.Tensor | None,
    towers: Sequence[str],
    *,
    float_extras: Mapping[str, str] | None = None,
    expect_quantized: bool = True,
    bits: BitSpec | None = None,
    quantizer: Any = None,
) -> VerificationReport:
    """Check the at-most-2^b-values property of every quantized tensor on one batch (see module doc).

    ``images`` are preprocessed pixels; ``tokens`` exercise the text tower and are required when ``"text"``
    is in ``towers``. ``bits`` is the run's bit spec and ``quantizer`` the run's quantizer (its
    :meth:`~qbench.quant.base.Quantizer.verification_layout` selects the core groupings; without one, the
    baseline layout); every run passes both. Runs without gradients and leaves the model as it found it.
    One :class:`VerificationSession` around one image pass and (text in scope) one text pass.
    """
    session = VerificationSession(vlm, towers, float_extras=float_extras, expect_quantized=expect_quantized,
                                  bits=bits, quantizer=quantizer)
    with session.recording("visual"):
        vlm.encode_image(images)
    if "text" in session.towers:
        if tokens is None:
            session.problems.append("text tower in scope but no tokens were given to exercise it")
        else:
            with session.recording("text"):
                vlm.encode_text(tokens)
    return session.report()


class VerificationSession:
    """:func:`verify_quantized` in three steps, so that the passes it watches can be passes that run anyway.

    Construction makes the plan, the rules and the static checks (declared quantizers, misplaced ones);
    :meth:`recording` wraps any forward pass of the model (``qbench eval`` wraps the first image pass of its
    evaluation encoding and the first pass of its class prompts, :func:`qbench.engine.evaluate.run`); :meth:`report`
    checks what the kernels consumed. The report of one image pass and one text pass equals
    :func:`verify_quantized`'s on the same inputs. :meth:`needs` says which towers hold a watched module at all:
    a pass through any other tower records nothing, so skipping it leaves the report unchanged (an unquantized
    ``fp32`` baseline needs no pass).
    """

    def __init__(self, vlm: VLM, towers: Sequence[str], *, float_extras: Mapping[str, str] | None = None,
                 expect_quantized: bool = True, bits: BitSpec | None = None, quantizer: Any = None) -> None:
        self.vlm = vlm
        self.towers = tuple(towers)
        self.extras = dict(float_extras or {})
        self.expect_quantized = expect_quantized
        problems: list[str] = []
        targets = [(name, module) for name, module in in_scope_modules(vlm, self.towers) if not is_under(name, self.extras)]
        self.quantized = {name: module for name, module in targets if isinstance(module, QuantModule)}
        self.plan = _plan(vlm, targets, bits, quantizer) if bits is not None else None
        if self.plan is not None:
            problems += list(self.plan.problems)
        if expect_quantized:
            problems += [f"{name}: in scope but carries no quantizer" for name, module in targets if name not in self.quantized]
            if not targets:
                problems.append(f"no quantizable module found in towers {', '.join(self.towers)}")
        problems += _misplaced_quantizers(vlm, self.towers, self.extras)
        self.problems = problems
        """Problems so far, in report order; a caller may add one (e.g. a tower it could not exercise)."""
        self.attentions = _watched_attention(vlm, self.towers, self.extras, self.plan)
        self.rules: dict[str, dict[str, TensorRule | None]] = {
            name: _module_rules(name, module, self.plan) for name, module in self.quantized.items()
        }
        self.rules.update({name: _slot_rules(module, self.plan) for name, module in self.attentions.items()})
        self.recorder = _KernelRecorder(self.quantized, self.attentions, _neutral_modules(vlm, self.extras), self.rules)
        self.recorded: set[str] = set()
        """Towers a :meth:`recording` pass completed for."""

    def needs(self, tower: str) -> bool:
        """Whether a pass through ``tower`` can change the report: a watched module or attention lives in it."""
        return any(self.vlm.tower_of(name) == tower for name in (*self.quantized, *self.attentions))

    @contextmanager
    def recording(self, tower: str) -> Iterator[None]:
        """Record the kernels of every pass run inside (without gradients); ``tower`` names the tower exercised,
        marked in :attr:`recorded` once the block completes."""
        with torch.no_grad(), self.recorder.watching():
            yield
        self.recorded.add(tower)

    def report(self) -> VerificationReport:
        """Every check on what the recorded passes consumed (:func:`verify_quantized`'s report)."""
        problems = list(self.problems)
        modules = tuple(_module_check(self.vlm, name, module, self.recorder, self.rules[name], self.plan, problems)
                        for name, module in self.quantized.items())
        slot_checks = tuple(check for name, module in self.attentions.items()
                            for check in _slot_checks(self.vlm, name, module, self.recorder, self.rules[name], self.plan,
                                                      problems))
        return VerificationReport(
            passed=not problems,
            n_modules=len(modules),
            modules=modules,
            float_extras=self.extras,
            problems=tuple(problems),
            slots=slot_checks,
            towers=self.towers,
            expect_quantized=self.expect_quantized,
            expected=self.plan.to_dict() if self.plan is not None else None,
        )


# -- plan and rules --------------------------------------------------------------------------------
def _plan(vlm: VLM, targets: Sequence[tuple[str, nn.Module]], bits: BitSpec, quantizer: Any) -> VerificationPlan:
    """The run's plan: its bit spec and the layout its quantizer's configuration selects (baseline without one)."""
    if quantizer is None:
        return verification_plan(bits, QuantLayout(), vlm, targets)
    try:
        layout = quantizer.verification_layout(bits)
    except Exception as error:  # a plugin's bug must fail the verification, not the run
        plan = verification_plan(bits, QuantLayout(), vlm, targets)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return dataclasses.replace(plan, problems=plan.problems + (f"layout: verification_layout failed: {reason}",))
    return verification_plan(bits, layout, vlm, targets)


def _module_rules(name: str, module: QuantModule, plan: VerificationPlan | None) -> dict[str, TensorRule | None]:
    """Weight and input rules of one quantized module: the plan's, or (declared mode) its quantizers' own."""
    context = CONV_INPUT if isinstance(module, nn.Conv2d) else LINEAR_INPUT
    if plan is not None:
        return {"weight": plan.weight_rule(name), "input": plan.input_rule(name, module)}
    weight_q, act_q = module.weight_quantizer, module.act_quantizer
    return {
        "weight": _declared_rule(weight_q, WEIGHT),
        "input": _declared_rule(act_q, context) if act_q is not None else None,
    }


def _slot_rules(attention: nn.Module, plan: VerificationPlan | None) -> dict[str, TensorRule | None]:
    """Rules of the four slots of one attention (None: not checked)."""
    rules: dict[str, TensorRule | None] = {}
    for slot in ATTENTION_SLOTS:
        quantizer = getattr(attention, slot, None)
        held = isinstance(quantizer, TensorQuantizer)
        if plan is not None:
            rules[slot] = plan.slot_rule(slot, held)
        else:
            rules[slot] = _declared_rule(quantizer, SLOT) if held else None
    return rules


def _declared_rule(quantizer: Any, context: str) -> TensorRule | None:
    """Declared mode: the quantizer's own bits and its granularity in core terms, counted without grid check."""
    bits = _declared_bits(quantizer)
    if bits is None:
        return None
    grouping, refused = declared_grouping(getattr(quantizer, "granularity", "per_tensor"), context)
    return TensorRule(bits, grouping, context, grid=False, refused=refused)


def _declared_bits(quantizer: Any) -> int | None:
    """A quantizer's declared bit-width, or None when it declares none (or nonsense)."""
    bits = getattr(quantizer, "bits", None)
    return bits if isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 16 else None


def _watched_attention(vlm: VLM, towers: Sequence[str], extras: Mapping[str, str],
                       plan: VerificationPlan | None) -> dict[str, nn.Module]:
    """In-scope rewritten attention whose slots the plan declares or that hold a quantizer."""
    declared = plan is not None and plan.bits.quantizes_activations and bool(plan.slots)
    watched = {}
    for name, module in vlm.model.named_modules():
        if not isinstance(module, QuantizableMultiheadAttention) or vlm.tower_of(name) not in towers:
            continue
        if is_under(name, vlm.head_modules) or is_under(name, extras):
            continue
        if declared or any(isinstance(getattr(module, slot, None), TensorQuantizer) for slot in ATTENTION_SLOTS):
            watched[name] = module
    return watched


def _neutral_modules(vlm: VLM, extras: Mapping[str, str]) -> list[nn.Module]:
    """The float extras' root modules (shared ones once): kernels they issue are float by design."""
    seen: dict[int, nn.Module] = {}
    for name, module in vlm.model.named_modules(remove_duplicate=False):
        if name in extras:
            seen.setdefault(id(module), module)
    return list(seen.values())


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


# -- checks ----------------------------------------------------------------------------------------
def _check_mode(name: str, role: str, quantizer: Any, problems: list[str]) -> None:
    """A quantizer must be frozen in ``quantize`` mode."""
    mode = getattr(quantizer, "mode", None)
    if mode is not Mode.QUANTIZE:
        shown = mode.value if isinstance(mode, Mode) else str(mode)
        problems.append(f"{name}: {role} quantizer is in '{shown}' mode, not 'quantize'")


def _check_declared(name: str, role: str, quantizer: Any, rule: TensorRule | None, plan: VerificationPlan,
                    problems: list[str]) -> None:
    """What the module's quantizer declares must match the run's plan (bits, presence)."""
    declared = _declared_bits(quantizer) if quantizer is not None else None
    where = " (first-layer rule)" if name in plan.first_layers and plan.first_layer_bits else ""
    if rule is None:
        if quantizer is not None:
            problems.append(f"{name}: {role} quantizer declares {declared} bits, but the run's bit spec {plan.bits} "
                            "keeps activations float")
    elif quantizer is None:
        problems.append(f"{name}: {role} carries no quantizer, but the run's bit spec {plan.bits} quantizes it to "
                        f"{rule.bits} bits")
    elif declared != rule.bits:
        problems.append(f"{name}: {role} quantizer declares {declared} bits, the run's bit spec {plan.bits} needs "
                        f"{rule.bits}{where}")


def _check_observed(name: str, role: str, rule: TensorRule, stats: _Stats, problems: list[str]) -> None:
    """The values the kernel consumed, against ``rule``: count, collapse, grid, finiteness."""
    if rule.refused is not None:
        problems.append(f"{name}: {role} quantizer's own granularity is refused ({rule.refused}); counted per tensor")
    if stats.observed == 0:
        return
    if stats.nonfinite:
        problems.append(f"{name}: {role} reaching the kernel holds non-finite values")
        return
    if stats.error is not None:
        problems.append(f"{name}: {role} cannot be grouped {rule.grouping}: {stats.error}")
        return
    if stats.max_unique > rule.levels:
        problems.append(f"{name}: {role} has {stats.max_unique} distinct values in a group, more than "
                        f"2^{rule.bits} = {rule.levels}")
    elif stats.max_unique < 2:
        problems.append(f"{name}: every group of its {role} holds a single value (collapsed or bypassed quantizer)")
    tensor_levels = rule.grouping.tensor_levels(rule.bits)
    if tensor_levels is not None and stats.tensor_unique > tensor_levels:
        problems.append(f"{name}: {role} has {stats.tensor_unique} distinct values in the tensor, more than "
                        f"{rule.grouping.size}·2^{rule.bits} = {tensor_levels} for {rule.grouping}")
    if stats.grid_steps is None:
        return
    if rule.grouping.grid == "log2":
        if stats.off_grid or stats.grid_steps > rule.levels - 2:
            problems.append(f"{name}: {role} holds values off the {rule.bits}-bit power-of-two levels s·2^-k "
                            f"(k <= {rule.levels - 2}) of {rule.grouping}")
    elif stats.grid_steps > rule.levels - 1:
        problems.append(f"{name}: {role} values in a group span {stats.grid_steps:.1f} steps of their smallest gap, "
                        f"more than the {rule.levels - 1} of a {rule.bits}-bit grid")


def _module_check(vlm: VLM, name: str, module: QuantModule, recorder: _KernelRecorder,
                  rules: Mapping[str, TensorRule | None], plan: VerificationPlan | None,
                  problems: list[str]) -> ModuleCheck:
    """Every check of one quantized Linear/Conv2d; appends its problems and returns its report entry."""
    calls, kernels = recorder.calls.get(name, 0), recorder.kernel_calls.get(name, 0)
    if calls == 0:
        problems.append(f"{name}: never ran on the verification batch")
    elif kernels == 0:
        problems.append(f"{name}: ran but never called F.linear/F.conv2d, so what it consumes could not be checked")
    if name in recorder.unattributed:
        problems.append(f"{name}: computes with {recorder.unattributed[name]}, not F.linear/F.conv2d, so its "
                        "operands cannot be attributed to input and weight")
    weight_q, act_q = module.weight_quantizer, module.act_quantizer
    weight_rule, input_rule = rules.get("weight"), rules.get("input")
    _check_mode(name, "weight", weight_q, problems)
    if act_q is not None:
        _check_mode(name, "input", act_q, problems)
    if plan is not None:
        _check_declared(name, "weight", weight_q, weight_rule, plan, problems)
        _check_declared(name, "input", act_q, input_rule, plan, problems)
    weight, act = recorder.stats_of(name, "weight"), recorder.stats_of(name, "input")
    if weight_rule is not None:
        _check_observed(name, "weight", weight_rule, weight, problems)
    if input_rule is not None:
        _check_observed(name, "input", input_rule, act, problems)
    return ModuleCheck(
        name=name,
        tower=vlm.tower_of(name),
        kind=type(module)._float_type.__name__,
        weight_bits=_declared_bits(weight_q),
        weight_max_unique=weight.max_unique if weight.observed else None,
        weight_granularity=str(getattr(weight_q, "granularity", None)),
        act_bits=(_declared_bits(act_q) or FLOAT_ACTIVATION_BITS) if act_q is not None else FLOAT_ACTIVATION_BITS,
        act_max_unique=act.max_unique if act_q is not None and act.observed else None,
        act_granularity=str(getattr(act_q, "granularity", None)) if act_q is not None else "float",
        fired=calls > 0,
        calls=calls,
        expected_weight_bits=weight_rule.bits if plan is not None and weight_rule is not None else None,
        expected_act_bits=(input_rule.bits if input_rule is not None else FLOAT_ACTIVATION_BITS) if plan is not None else None,
        weight_grouping=str(weight_rule.grouping) if weight_rule is not None else None,
        act_grouping=str(input_rule.grouping) if input_rule is not None else "float",
        weight_min_group=weight.min_group,
        act_min_group=act.min_group if input_rule is not None else None,
        weight_grid_steps=weight.grid_steps,
        act_grid_steps=act.grid_steps if input_rule is not None else None,
    )


def _slot_checks(vlm: VLM, name: str, attention: nn.Module, recorder: _KernelRecorder,
                 rules: Mapping[str, TensorRule | None], plan: VerificationPlan | None,
                 problems: list[str]) -> list[ModuleCheck]:
    """The checks of one watched attention's slots (one entry per slot with a rule or a quantizer)."""
    if name in recorder.unattributed:
        problems.append(f"{name}: attention issues {recorder.unattributed[name]} beyond its q·kᵀ and probs·v "
                        "products, so its slot operands cannot be attributed")
    checks = []
    for slot in ATTENTION_SLOTS:
        quantizer = getattr(attention, slot, None)
        held = isinstance(quantizer, TensorQuantizer)
        rule = rules.get(slot)
        if rule is None and not held:
            continue
        label = f"{name}.{slot}"
        stats = recorder.stats_of(name, slot)
        if held:
            _check_mode(label, "output", quantizer, problems)
        if plan is not None:
            if rule is not None and not held:
                problems.append(f"{label}: the run's layout declares a {rule.grouping} slot quantizer, but the slot "
                                "holds none")
            else:
                _check_declared(label, "output", quantizer, rule, plan, problems)
        if rule is not None:
            if stats.observed == 0:
                problems.append(f"{label}: attention slot quantizer never ran on the verification batch")
            _check_observed(label, "output", rule, stats, problems)
        checks.append(ModuleCheck(
            name=label,
            tower=vlm.tower_of(label),
            kind="attention-slot",
            weight_bits=None,
            weight_max_unique=None,
            weight_granularity=None,
            act_bits=(_declared_bits(quantizer) or FLOAT_ACTIVATION_BITS) if held else FLOAT_ACTIVATION_BITS,
            act_max_unique=stats.max_unique if stats.observed else None,
            act_granularity=str(getattr(quantizer, "granularity", None)) if held else "float",
            fired=stats.observed > 0,
            calls=stats.observed,
            expected_act_bits=(rule.bits if rule is not None else FLOAT_ACTIVATION_BITS) if plan is not None else None,
            act_grouping=str(rule.grouping) if rule is not None else "float",
            act_min_group=stats.min_group,
            act_grid_steps=stats.grid_steps,
        ))
    return checks
