"""Light QAT: the shared quantization-aware training loop of every qbench QAT method (``quantizers.md`` §1.8).

A QAT method inserts its quantizers, initialises them with one calibration pass and then fine-tunes the
fake-quantized *student* against a frozen float *teacher* on the proxy pairs:

* **Trainables**: the weights and biases of the quantized modules (``lr_weights`` = 1e-6) and the method's
  own parameters (LSQ steps/offsets, ...; ``lr_quant`` = 1e-4). Everything else — embeddings, norms,
  heads, logit scale/bias — is frozen. AdamW β = (0.9, 0.999), eps 1e-8, weight decay 0 (keeps the FP
  solution as the anchor), constant lr, gradient-norm clip 1.0; ``steps`` (100) batches of ``batch_size``
  (100) pairs, reshuffled every epoch with a seeded generator, so the same seed gives the same model on CPU.
  Every batch size here (calibration, teacher targets, training) is the quantizer's own hashed ``batch_size``,
  never the evaluation's memory-chosen one, and the gradient-norm clip sums in a fixed order
  (:mod:`qbench.quant.determinism`), so neither ``--batch-size`` nor ``--threads`` changes the trained model.
* **Logits**: ``S = s·ẑ_I ẑ_Tᵀ`` (+ bias for SigLIP) with the model's frozen scale, ẑ normalised per tower.
  In visual scope the text side comes from the FP text tower (the teacher's, identical and frozen).
* **Losses** (:data:`DISTILL_REGIMES`): ``contrastive`` — symmetric cross-entropy (SigLIP: its sigmoid
  loss); ``hybrid`` — contrastive + λ·mean‖ẑ_s − ẑ_t‖² per quantized tower; ``kl`` — contrastive +
  λ·½[KL rows + KL cols] of teacher vs student logits; λ = ``distill_weight`` = 0.5, added
  (``distill_form="additive"``) or as the convex mix ``(1−λ)·L_con + λ·L_distill`` (``"convex"``).

The student runs in eval mode (no dropout, norms and BatchNorm statistics frozen — §1.1), with its
quantizer modules switched to training mode so that quantizers which adapt during training (the EMA
activation ranges of an STE method) know when to. :class:`LightQATQuantizer` is the plugin skeleton the QAT
methods share: they only say which quantizers go where and which of their parameters learn.

**Step checkpoints** (:mod:`qbench.quant.training_state`): given a :class:`TrainingCheckpoints`, the loop
writes its complete state every ``every_steps`` optimizer steps (one safetensors file, replaced atomically) and
a rerun of the same quantization continues from the last one. The result is bit-identical to an uninterrupted
run (same final parameters, buffers and training record; on CUDA, as far as its kernels are deterministic)
because every input of the remaining steps is either restored — parameters and buffers, AdamW moments and step
counts, training-time attributes modules keep outside their state dict (EMA observer ranges,
LoRA dropout call counters, :class:`~qbench.quant.training_state.ResumableState`), the global RNGs,
the losses so far — or recomputed from the seed exactly as the first run computed it: the batch schedule
(the run continues at its saved position), the teacher's targets, the model structure. A stored state that is
corrupt or written for another run is reported, deleted and ignored (training starts at step 0). Nothing about
resuming enters provenance.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Protocol, Sequence

from qbench.errors import QbenchError
from qbench.lazy import no_grad
from qbench.params import require_choice
from qbench.quant.base import CalibrationData, ProgressCallback, QuantizedModel, Quantizer, QuantizerConfig
from qbench.quant.spec import BitSpec, Scope

if TYPE_CHECKING:  # QAT plugins subclass LightQATQuantizer at registration (qbench list): torch is imported in the functions
    import torch
    from torch import nn

    from qbench.quant.modules import QuantModule, TensorQuantizer
    from qbench.quant.training_state import TrainingCheckpoints
    from qbench.vlm import VLM

__all__ = ["Additions", "LightQATConfig", "LightQATQuantizer"]

DISTILL_REGIMES = ("contrastive", "hybrid", "kl")
DISTILL_FORMS = ("additive", "convex")
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
GRAD_CLIP = 1.0


SCHEDULES = {"light": 100, "medium": 900, "long": 8100}
"""Named training lengths (steps of ``batch_size`` pairs): the study's Light QAT (100 steps) and the ends of
its longer sweep (100 … 8100 steps, ×3 apart; seed paper, appendix Table 4)."""


def schedule_steps(value: str) -> int:
    """Steps for a schedule name (:data:`SCHEDULES`) or a plain positive step count."""
    text = str(value).strip().lower()
    if text in SCHEDULES:
        return SCHEDULES[text]
    if text.isdigit() and int(text) > 0:
        return int(text)
    names = ", ".join(f"{name} ({steps} steps)" for name, steps in SCHEDULES.items())
    raise QbenchError(f"bad schedule {value!r}: use {names} or a positive number of steps")


# -- losses ----------------------------------------------------------------------------------------
def batch_logits(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float | None) -> torch.Tensor:
    """``S = s·ẑ_I ẑ_Tᵀ`` (+ SigLIP's bias) for a batch of normalised image and text embeddings."""
    logits = scale * image @ text.T
    return logits + bias if bias is not None else logits


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float | None) -> torch.Tensor:
    """``quantizers.md`` §1.8: ½[CE(S, diag) + CE(Sᵀ, diag)] with S = s·ẑ_I ẑ_Tᵀ; SigLIP (bias):
    ``−mean_ij log σ(y_ij·S_ij)``, y = +1 on the diagonal, −1 elsewhere."""
    import torch
    import torch.nn.functional as F

    logits = batch_logits(image, text, scale, bias)
    if bias is not None:
        labels = 2.0 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1.0
        return -F.logsigmoid(labels * logits).mean()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_batch ‖ẑ_student − ẑ_teacher‖²`` summed over embedding dims (= 2 − 2cos for unit vectors)."""
    return (student - teacher).pow(2).sum(dim=-1).mean()


def logit_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``½[KL(softmax(S_t) ‖ softmax(S_s))`` over rows ``+`` over columns``]``, temperature 1, batch mean."""
    import torch.nn.functional as F

    rows = F.kl_div(student.log_softmax(dim=1), teacher.log_softmax(dim=1), log_target=True, reduction="batchmean")
    cols = F.kl_div(student.T.log_softmax(dim=1), teacher.T.log_softmax(dim=1), log_target=True, reduction="batchmean")
    return 0.5 * (rows + cols)


@dataclass(frozen=True)
class Embeddings:
    """Normalised image and text embeddings of one batch."""

    image: torch.Tensor
    text: torch.Tensor


class AuxiliaryLoss(Protocol):
    """An extra training term a method adds to the Light-QAT objective (e.g. Q-ViT's DGD).

    :meth:`capture` is active around the student's forward pass of a batch (hooks record what the term
    needs); calling the object afterwards with that batch's images and tokens returns the weighted term
    (it may run the teacher on the same batch). ``name`` labels it in the training record.
    """

    name: str

    def capture(self) -> ContextManager[None]: ...

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


def qat_loss(
    student: Embeddings,
    teacher: Embeddings,
    towers: Sequence[str],
    *,
    distill: str,
    weight: float,
    form: str,
    scale: float,
    bias: float | None,
) -> torch.Tensor:
    """The Light-QAT objective of one batch (``quantizers.md`` §1.8) for the given regime."""
    loss = contrastive_loss(student.image.float(), student.text.float(), scale, bias)
    if distill == "contrastive":
        return loss
    if distill == "hybrid":
        extra = feature_loss(student.image.float(), teacher.image.float())
        if "text" in towers:
            extra = extra + feature_loss(student.text.float(), teacher.text.float())
    else:
        extra = logit_kl(
            batch_logits(student.image.float(), student.text.float(), scale, bias),
            batch_logits(teacher.image.float(), teacher.text.float(), scale, bias),
        )
    return (1.0 - weight) * loss + weight * extra if form == "convex" else loss + weight * extra


# -- settings, schedule, record --------------------------------------------------------------------
@dataclass(frozen=True)
class QATSettings:
    """Hyperparameters of one Light-QAT run (the defaults are §1.8's)."""

    steps: int = 100
    batch_size: int = 100
    lr_weights: float = 1e-6
    lr_quant: float = 1e-4
    distill: str = "contrastive"
    distill_weight: float = 0.5
    distill_form: str = "additive"
    grad_clip: float = GRAD_CLIP

    def check(self, label: str = "qat") -> None:
        """One-line errors for settings that cannot train."""
        require_choice(self.distill, DISTILL_REGIMES, f"{label}.distill")
        require_choice(self.distill_form, DISTILL_FORMS, f"{label}.distill_form")
        if self.steps < 0 or self.batch_size < 2:
            raise QbenchError(f"{label}: steps must be >= 0 and batch_size >= 2, got {self.steps}, {self.batch_size}")
        values = (self.lr_weights, self.lr_quant, self.distill_weight, self.grad_clip)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise QbenchError(f"{label}: learning rates, distill_weight and grad clip must be finite and >= 0")


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index batches over ``n`` pairs: batch = min(batch_size, n), a fresh seeded permutation per
    epoch, the incomplete tail of an epoch dropped (every contrastive batch has the same size)."""
    import torch

    if n < 2:
        raise QbenchError(f"Light QAT needs at least 2 calibration pairs (a contrastive batch), got {n}")
    batch = min(batch_size, n)
    per_epoch = n // batch
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=generator)
        batches += [order[i * batch : (i + 1) * batch] for i in range(per_epoch)]
    return batches[:steps]


@dataclass
class TrainingRecord:
    """What a Light-QAT run did, for provenance: the loss of every step and the set-level loss around it.

    ``losses`` are the full objective (auxiliary term included); ``auxiliary_losses`` the weighted
    auxiliary term alone, when the method has one.
    """

    steps: int
    batch_size: int
    losses: list[float] = field(default_factory=list)
    auxiliary: str | None = None
    auxiliary_losses: list[float] = field(default_factory=list)
    loss_before: float | None = None
    loss_after: float | None = None

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict[str, Any]:
        record = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "calibration_loss_before": self.loss_before,
            "calibration_loss_after": self.loss_after,
            "losses": list(self.losses),
        }
        if self.auxiliary is not None:
            record.update(auxiliary=self.auxiliary, auxiliary_losses=list(self.auxiliary_losses))
        return record


# -- teacher and student ---------------------------------------------------------------------------
def make_teacher(vlm: VLM) -> VLM:
    """A frozen float copy in eval mode (take it before any quantizer is inserted)."""
    teacher = copy.deepcopy(vlm)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@no_grad
def teacher_embeddings(teacher: VLM, data: CalibrationData, batch_size: int) -> Embeddings:
    """The teacher's embeddings of every calibration pair, computed once (it is frozen and deterministic)."""
    import torch

    images = torch.cat([teacher.encode_image(x) for x in data.images.split(batch_size)])
    texts = torch.cat([teacher.encode_text(t) for t in data.tokens.split(batch_size)])
    return Embeddings(images, texts)


def student_embeddings(student: VLM, images: torch.Tensor, tokens: torch.Tensor, teacher_text: torch.Tensor,
                       towers: Sequence[str]) -> Embeddings:
    """The student's embeddings; in visual scope the text side is the FP text tower's (the teacher's)."""
    from qbench.quant.observers import text_token_mask, valid_tokens

    image = student.encode_image(images)
    if "text" not in towers:
        return Embeddings(image, teacher_text)
    with valid_tokens(text_token_mask(tokens).to(student.device)):
        text = student.encode_text(tokens)
    return Embeddings(image, text)


def weight_parameters(modules: dict[str, QuantModule]) -> list[nn.Parameter]:
    """Weights and biases of the quantized modules (each Parameter once)."""
    from torch import nn

    seen: dict[int, nn.Parameter] = {}
    for module in modules.values():
        for parameter in (module.weight, getattr(module, "bias", None)):
            if isinstance(parameter, nn.Parameter):
                seen.setdefault(id(parameter), parameter)
    return list(seen.values())


@contextmanager
def training_state(student: VLM, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Student in eval mode with its quantizers (and their children, e.g. Q-ViT's IRM) in training mode and
    only ``trainable`` requiring grad; everything restored (eval mode throughout) afterwards."""
    import torch

    from qbench.quant.modules import eval_mode, tensor_quantizers

    keep = {id(p) for p in trainable}
    saved = [(p, p.requires_grad) for p in student.parameters()]
    with eval_mode(student):
        for _, quantizer in tensor_quantizers(student.model):
            quantizer.train()
        try:
            for parameter, _ in saved:
                parameter.requires_grad_(id(parameter) in keep)
            with torch.enable_grad():
                yield
        finally:
            for parameter, flag in saved:
                parameter.requires_grad_(flag)


def _batch_objective(
    student: VLM,
    targets: Embeddings,
    data: CalibrationData,
    index: torch.Tensor | slice,
    towers: Sequence[str],
    settings: QATSettings,
    auxiliary: AuxiliaryLoss | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Light-QAT loss of one batch (and its auxiliary term alone, if any)."""
    import torch

    device_index = index.to(student.device) if isinstance(index, torch.Tensor) else index
    teacher = Embeddings(targets.image[device_index], targets.text[device_index])
    images, tokens = data.images[index], data.tokens[index]
    with auxiliary.capture() if auxiliary is not None else nullcontext():
        out = student_embeddings(student, images, tokens, teacher.text, towers)
    loss = qat_loss(out, teacher, towers, distill=settings.distill, weight=settings.distill_weight,
                    form=settings.distill_form, scale=student.logit_scale, bias=student.logit_bias)
    if auxiliary is None:
        return loss, None
    extra = auxiliary(images, tokens)
    return loss + extra, extra


@no_grad
def calibration_loss(student: VLM, targets: Embeddings, data: CalibrationData, towers: Sequence[str],
                     settings: QATSettings, auxiliary: AuxiliaryLoss | None = None) -> float:
    """Mean Light-QAT objective over the calibration set in consecutive batches (eval mode, no adaptation)."""
    from qbench.quant.modules import eval_mode

    batch = min(settings.batch_size, len(data))
    total, count = 0.0, 0
    with eval_mode(student):
        for start in range(0, len(data) - batch + 1, batch):
            loss, _ = _batch_objective(student, targets, data, slice(start, start + batch), towers, settings, auxiliary)
            total, count = total + float(loss), count + 1
    return total / max(count, 1)


def resume_identity(
    student: VLM,
    data: CalibrationData,
    towers: Sequence[str],
    settings: QATSettings,
    *,
    batch: int,
    seed: int,
    groups: Sequence[dict[str, Any]],
    auxiliary: AuxiliaryLoss | None,
) -> dict[str, Any]:
    """What a step state must have been written for to continue this run: steps, batch size, seed, settings,
    towers, calibration set, auxiliary term and the name, shape and dtype of every trainable parameter (in
    optimizer order, with its group)."""
    names: dict[int, str] = {}
    for name, parameter in student.model.named_parameters():
        names.setdefault(id(parameter), name)
    trainable = [[index, names.get(id(p), "?"), list(p.shape), str(p.dtype)]
                 for index, group in enumerate(groups) for p in group["params"]]
    return {
        "steps": settings.steps, "batch_size": batch, "seed": seed, "settings": dataclasses.asdict(settings),
        "towers": list(towers), "calibration": {"fingerprint": data.fingerprint, "pairs": len(data)},
        "auxiliary": auxiliary.name if auxiliary is not None else None, "trainable": trainable,
    }


def resume_training(checkpoints: TrainingCheckpoints, identity: dict[str, Any], student: VLM,
                    optimizer: torch.optim.Optimizer, record: TrainingRecord) -> int:
    """Continue from the stored step state if a usable one exists: model, optimizer, module extras, RNGs and
    the record so far are restored and ``on_resume`` is told; returns the step reached (0: from the start)."""
    from qbench.quant.training_state import restore_state

    state = checkpoints.load(identity, record.steps, student.model, optimizer)
    if state is None:
        return 0
    restore_state(state, student.model, optimizer)
    record.losses, record.auxiliary_losses = list(state.losses), list(state.auxiliary_losses)
    record.loss_before = state.loss_before
    if checkpoints.on_resume is not None:
        checkpoints.on_resume(state.step, record.steps)
    return state.step


def save_step(checkpoints: TrainingCheckpoints, identity: dict[str, Any], step: int, student: VLM,
              optimizer: torch.optim.Optimizer, record: TrainingRecord) -> None:
    """Write the state after optimizer ``step`` when it is due (every ``every_steps``, never after the last)."""
    from qbench.quant.training_state import capture_state

    if checkpoints.due(step, record.steps):
        state = capture_state(step, student.model, optimizer, losses=record.losses,
                              auxiliary_losses=record.auxiliary_losses, loss_before=record.loss_before)
        checkpoints.save(state, identity)


def train_light_qat(
    student: VLM,
    teacher: VLM,
    data: CalibrationData,
    towers: Sequence[str],
    settings: QATSettings,
    *,
    weights: Sequence[nn.Parameter],
    quant_params: Sequence[nn.Parameter],
    seed: int,
    progress: ProgressCallback | None = None,
    auxiliary: AuxiliaryLoss | None = None,
    checkpoints: TrainingCheckpoints | None = None,
) -> TrainingRecord:
    """Fine-tune ``student`` (quantizers already initialised) against ``teacher`` on ``data``; in place.

    ``weights`` learn at ``lr_weights`` and ``quant_params`` at ``lr_quant`` (AdamW, constant lr, clip
    ``grad_clip``); nothing else changes. ``auxiliary`` adds a method's own term to every batch's loss.
    With ``checkpoints`` the run continues from a stored step state of the same run, if any, and writes its
    own every ``checkpoints.every_steps`` steps; the result is the same as without. ``progress`` sees
    absolute step numbers. Returns the per-step losses and the calibration-set objective before and after.
    Everything runs on the student's device.
    """
    import torch

    from qbench.quant.determinism import clip_grad_norm_ordered

    settings.check()
    device = student.device
    batch = min(settings.batch_size, len(data))
    targets = teacher_embeddings(teacher, data, batch)
    targets = Embeddings(targets.image.to(device), targets.text.to(device))
    record = TrainingRecord(steps=settings.steps, batch_size=batch,
                            auxiliary=auxiliary.name if auxiliary is not None else None)
    record.loss_before = calibration_loss(student, targets, data, towers, settings, auxiliary)
    groups = [
        {"params": list(params), "lr": lr}
        for params, lr in ((weights, settings.lr_weights), (quant_params, settings.lr_quant))
        if len(params)
    ]
    if settings.steps == 0 or not groups:
        record.loss_after = record.loss_before
        return record
    optimizer = torch.optim.AdamW(groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0, foreach=True)
    trainable = [p for group in groups for p in group["params"]]
    schedule = batch_schedule(len(data), batch, settings.steps, seed)
    identity: dict[str, Any] = {}
    start = 0
    if checkpoints is not None:
        identity = resume_identity(student, data, towers, settings, batch=batch, seed=seed, groups=groups,
                                   auxiliary=auxiliary)
        start = resume_training(checkpoints, identity, student, optimizer, record)
    with training_state(student, trainable):
        for step in range(start + 1, settings.steps + 1):
            loss, extra = _batch_objective(student, targets, data, schedule[step - 1], towers, settings, auxiliary)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm_ordered(trainable, settings.grad_clip)  # thread-count independent norm
            optimizer.step()
            record.losses.append(float(loss.detach()))
            if extra is not None:
                record.auxiliary_losses.append(float(extra.detach()))
            if checkpoints is not None:
                save_step(checkpoints, identity, step, student, optimizer, record)
            if progress is not None:
                progress(step, settings.steps, record.losses[-1])
    optimizer.zero_grad(set_to_none=True)
    record.loss_after = calibration_loss(student, targets, data, towers, settings, auxiliary)
    return record


# -- plugin skeleton -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LightQATConfig(QuantizerConfig):
    """Light QAT (§1.8): ``steps`` × ``batch_size`` pairs from the first ``n_calibration``; AdamW at
    ``lr_weights`` (module weights/biases) and ``lr_quant`` (quantizer parameters); regime ``distill``
    (contrastive, hybrid, kl) with weight ``distill_weight`` (λ), ``additive`` or ``convex``."""

    steps: int = 100
    batch_size: int = 100
    lr_weights: float = 1e-6
    lr_quant: float = 1e-4
    distill: str = "contrastive"
    distill_weight: float = 0.5
    distill_form: str = "additive"
    n_calibration: int = 1000

    def settings(self) -> QATSettings:
        return QATSettings(
            steps=self.steps, batch_size=self.batch_size, lr_weights=self.lr_weights, lr_quant=self.lr_quant,
            distill=self.distill, distill_weight=self.distill_weight, distill_form=self.distill_form,
        )


@dataclass
class Additions:
    """What a method adds around the standard layout: float modules the verifier must list (``{name inside
    vlm.model: reason}``) and provenance entries."""

    float_extras: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: "Additions") -> "Additions":
        return Additions({**self.float_extras, **other.float_extras}, {**self.provenance, **other.provenance})


class LightQATQuantizer(Quantizer):
    """Shared QAT pipeline; each step is a method a QAT plugin may override:

    1. FP teacher copy, attention rewrite of the towers in scope;
    2. :meth:`prepare` — an exact float transform before wrapping (a rotation; none by default);
    3. :meth:`wrap` — quantizers from :meth:`weight_quantizer` / :meth:`act_quantizer` on every in-scope
       Linear/Conv2d (a LoRA method wraps with adapter layers instead);
    4. :meth:`install` — anything else that needs the wrapped modules (attention-map quantizers);
    5. one calibration pass, then Light QAT of :meth:`trainable_weights` (lr_weights) and
       :meth:`quantizer_parameters` (lr_quant), plus :meth:`auxiliary_loss` if the method has one;
    6. :meth:`artifacts` — trained tensors to keep beside the deployed model (LoRA factors),
       then :meth:`finalize` — fix whatever adapted during training for deployment (a LoRA method merges its
       adapters), then provenance.

    Set :attr:`progress` to a ``(step, total, loss)`` callable to follow training, and
    :attr:`training_checkpoints` to make the training resumable (step checkpoints; the result and its
    provenance are the same as without). A method whose modules keep training-time state in plain attributes
    (outside parameters and buffers) implements :class:`~qbench.quant.training_state.ResumableState` on them.
    """

    family = "qat"
    needs_data = True
    needs_grad = True
    Config = LightQATConfig
    training_checkpoints: TrainingCheckpoints | None = None
    """Set by the runner (like :attr:`progress`): where and how often Light QAT keeps step checkpoints."""

    @abstractmethod
    def weight_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer:
        """The weight quantizer of one in-scope module."""

    @abstractmethod
    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        """The input quantizer of one in-scope module (None at A16)."""

    def prepare(self, model: VLM, bits: BitSpec, towers: Sequence[str], seed: int) -> Additions:
        """An exact float re-parameterisation applied before wrapping (none by default)."""
        return Additions()

    def wrap(self, model: VLM, bits: BitSpec, towers: Sequence[str]) -> dict[str, QuantModule]:
        """Replace every in-scope Linear/Conv2d by its quantized twin from the two factories."""
        from qbench.quant.modules import quantize_modules

        return quantize_modules(
            model,
            towers,
            lambda name, module: self.weight_quantizer(bits, name, module),
            lambda name, module: self.act_quantizer(bits, name, module),
        )

    def install(self, model: VLM, bits: BitSpec, towers: Sequence[str], wrapped: dict[str, QuantModule]) -> Additions:
        """Extra quantizers or modules that need the wrapped model, before calibration (none by default)."""
        return Additions()

    def trainable_weights(self, wrapped: dict[str, QuantModule]) -> list[nn.Parameter]:
        """The model parameters trained at ``lr_weights``: the quantized modules' weights and biases."""
        return weight_parameters(wrapped)

    def quantizer_parameters(self, model: VLM, wrapped: dict[str, QuantModule]) -> list[nn.Parameter]:
        """The method's own parameters trained at ``lr_quant`` (none by default)."""
        return []

    def auxiliary_loss(self, model: VLM, teacher: VLM, towers: Sequence[str]) -> AuxiliaryLoss | None:
        """An extra training term (none by default)."""
        return None

    def artifacts(self, model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, torch.Tensor]:
        """Trained tensors to keep beside the deployed model (taken before :meth:`finalize`; none by default)."""
        return {}

    def finalize(self, model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, Any]:
        """Fix whatever adapted during training for deployment; returns provenance entries."""
        return {}

    def quantize(
        self,
        model: VLM,
        bits: BitSpec,
        scope: Scope,
        calibration: CalibrationData | None,
        seed: int,
    ) -> QuantizedModel:
        from qbench.quant.calibrate import calibrate_and_freeze
        from qbench.quant.modules import first_module_settings, layout_counts, rewrite_tower_attention

        config: LightQATConfig = self.config  # type: ignore[assignment]
        settings = config.settings()
        settings.check(self.name)
        if config.n_calibration < 2:
            raise QbenchError(f"{self.name}.n_calibration must be >= 2, got {config.n_calibration}")
        if calibration is None or len(calibration) < 2:
            raise QbenchError(f"quantizer {self.name!r} needs calibration data: pass a proxy (--proxy) with image-caption pairs")
        towers = scope.towers
        data = calibration.take(config.n_calibration)
        teacher = make_teacher(model)
        rewritten = rewrite_tower_attention(model, towers)
        additions = self.prepare(model, bits, towers, seed)
        wrapped = self.wrap(model, bits, towers)
        additions = additions.merge(self.install(model, bits, towers, wrapped))
        fitted = calibrate_and_freeze(
            model, data, towers, n=len(data), batch_size=min(config.batch_size, len(data)), method=self.name
        )
        quant_params = self.quantizer_parameters(model, wrapped)
        record = train_light_qat(
            model, teacher, data, towers, settings, weights=self.trainable_weights(wrapped),
            quant_params=quant_params, seed=seed, progress=self.progress,
            auxiliary=self.auxiliary_loss(model, teacher, towers), checkpoints=self.training_checkpoints,
        )
        artifacts = {name: tensor.detach().clone() for name, tensor in self.artifacts(model, wrapped).items()}
        extras = self.finalize(model, wrapped)
        model.eval()  # deployed state: adaptive quantizers (EMA ranges) frozen, no dropout
        model.clear_caches()
        provenance = {
            "method": self.name,
            "config": self.params(),
            "bits": str(bits),
            "scope": scope.value,
            "seed": seed,
            "calibration": fitted,
            "training": record.to_dict(),
            "optimizer": {"name": "AdamW", "betas": list(ADAMW_BETAS), "eps": ADAMW_EPS, "weight_decay": 0.0,
                          "grad_clip": settings.grad_clip, "schedule": "constant"},
            **first_module_settings(wrapped),
            **layout_counts(model, wrapped, rewritten),
            "extra_parameters": sum(p.numel() for p in quant_params),
            **additions.provenance,
            **extras,
        }
        return QuantizedModel(model, provenance=provenance, float_extras=dict(additions.float_extras), artifacts=artifacts)
