"""Step checkpoints of Light QAT: a training run's complete state after optimizer step k in one file, so an
interrupted run resumes and ends bit-identical to an uninterrupted one (``quantizers.md`` §1.8).

:class:`TrainingCheckpoints` says where one quantization's step state lives and how often
:func:`qbench.quant.qat.train_light_qat` writes it. A step state (:class:`StepState`) is everything the rest of
the run depends on:

* the student's ``state_dict()`` — every parameter and buffer (weights, LSQ steps, EMA scales, IRM running
  statistics, ...);
* the AdamW state — ``exp_avg``, ``exp_avg_sq`` and ``step`` per parameter, and the group hyperparameters;
* training-time state that modules keep in plain attributes, outside parameters and buffers, through
  :class:`ResumableState` (EMA observer ranges, LoRA dropout call counters);
* the RNG states — torch CPU, every CUDA device's when CUDA is initialised, numpy's and Python ``random``'s;
* the step k itself (the data order is :func:`~qbench.quant.qat.batch_schedule`, recomputed from the seed, so
  the position in it is all there is to save) and the training record so far (losses, ``loss_before``).

Format: one safetensors file, :data:`STATE_FILE` (tensors only: never pickle, so loading runs no code).
Tensors are named ``model/<state-dict key>``, ``optimizer/<parameter index>/<key>``, ``extra/<module>/<key>``
and ``rng/...``. The safetensors metadata holds the rest as one JSON string — format tag and version, step,
the run's identity (settings, seed, trainable parameters, ...), record, optimizer hyperparameters, non-tensor
extra state and a SHA-256 over every tensor's name, dtype, shape and bytes in name order — plus the SHA-256 of
that JSON string, so a flipped byte anywhere in the file is caught. The file is replaced atomically
(:func:`qbench.atomic.write_atomic_with`). A state that cannot be used — unreadable, truncated, a checksum
mismatch, another format version, written for another run (identity) or not fitting the model and optimizer —
is reported through ``on_discard``, deleted and ignored: training then starts from step 0. Nothing is applied
before the whole state has been checked.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Union, runtime_checkable

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from qbench.atomic import remove_path, write_atomic_with
from qbench.errors import QbenchError

STATE_FILE = "qat-step.safetensors"
FORMAT = "qbench-qat-step"
VERSION = 1
STATE_KEY = "qbench.training_state"
"""safetensors metadata key of the JSON body."""
DIGEST_KEY = "qbench.training_state.sha256"
"""safetensors metadata key of the SHA-256 of the JSON body."""

ExtraValue = Union[torch.Tensor, int, float, bool, str, None]


@runtime_checkable
class ResumableState(Protocol):
    """A module whose training changes state outside its parameters and buffers (plain attributes).

    It hands that state out (:meth:`resume_state`: tensors or JSON scalars by name) and takes it back
    (:meth:`load_resume_state`, same names), so a resumed run continues exactly where the saved one was.
    """

    def resume_state(self) -> dict[str, ExtraValue]: ...

    def load_resume_state(self, state: dict[str, ExtraValue]) -> None: ...


class UnusableState(Exception):
    """A stored step state that must not be used; the message is the one-line reason."""


# -- what a step state holds -----------------------------------------------------------------------
@dataclass
class RNGState:
    """The global random generators: torch CPU, CUDA per device (empty when CUDA is not initialised), numpy, Python."""

    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor]
    numpy: tuple[Any, ...]
    python: tuple[Any, ...]


def capture_rng() -> RNGState:
    """The current state of every global generator."""
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return RNGState(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())


def restore_rng(state: RNGState) -> None:
    """Put every global generator back; CUDA states only where this machine has as many devices as were saved
    (the Light-QAT loop draws from seeded generators of its own, so nothing it computes depends on them)."""
    torch.set_rng_state(state.torch_cpu)
    if state.cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(state.cuda):
        torch.cuda.set_rng_state_all(state.cuda)
    np.random.set_state(state.numpy)
    random.setstate(state.python)


@dataclass
class StepState:
    """A Light-QAT run after optimizer step ``step``: model, optimizer, module extras, RNGs and the record so far."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    """``torch.optim.Optimizer.state_dict()`` form: ``{"state": {index: {key: value}}, "param_groups": [...]}``."""
    extra: dict[str, dict[str, ExtraValue]]
    rng: RNGState
    losses: list[float]
    auxiliary_losses: list[float] = field(default_factory=list)
    loss_before: float | None = None


def module_extra_state(model: nn.Module) -> dict[str, dict[str, ExtraValue]]:
    """The :class:`ResumableState` of every module below ``model`` that has some, by module name."""
    return {name: dict(module.resume_state()) for name, module in model.named_modules()
            if isinstance(module, ResumableState)}


def capture_state(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *, losses: list[float],
                  auxiliary_losses: list[float], loss_before: float | None) -> StepState:
    """The state of a run right after optimizer step ``step`` (tensors are shared, not copied: write it at once)."""
    return StepState(step, dict(model.state_dict()), optimizer.state_dict(), module_extra_state(model),
                     capture_rng(), list(losses), list(auxiliary_losses), loss_before)


def restore_state(state: StepState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put a checked state (see :func:`state_mismatch`) back into ``model``, ``optimizer`` and the generators.

    The model loads strictly and in place (the optimizer keeps its Parameters); the optimizer keeps its own
    group hyperparameters, which the check found equal to the saved ones.
    """
    model.load_state_dict(state.model, strict=True)
    optimizer.load_state_dict({"state": state.optimizer["state"], "param_groups": optimizer.state_dict()["param_groups"]})
    modules = dict(model.named_modules())
    for name, values in state.extra.items():
        modules[name].load_resume_state(dict(values))
    restore_rng(state.rng)


# -- checks against the live run -------------------------------------------------------------------
def as_json(value: Any) -> Any:
    """``value`` as it comes back from JSON (tuples become lists), for comparisons with stored values."""
    return json.loads(json.dumps(value, sort_keys=True))


def identity_difference(saved: Any, current: Mapping[str, Any]) -> list[str]:
    """The top-level identity fields in which a stored state differs from this run."""
    expected = as_json(dict(current))
    if not isinstance(saved, dict):
        return ["identity"]
    return [key for key in sorted(set(saved) | set(expected)) if saved.get(key) != expected.get(key)]


def _model_mismatch(saved: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    live = model.state_dict()
    if saved.keys() != live.keys():
        missing, unexpected = len(live.keys() - saved.keys()), len(saved.keys() - live.keys())
        return f"model tensors differ ({missing} missing, {unexpected} unexpected)"
    for key, tensor in saved.items():
        if tensor.shape != live[key].shape or tensor.dtype != live[key].dtype:
            return (f"model tensor {key} is {tuple(tensor.shape)} {tensor.dtype}, "
                    f"the model has {tuple(live[key].shape)} {live[key].dtype}")
    return None


def _optimizer_mismatch(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> str | None:
    live_groups = optimizer.state_dict()["param_groups"]
    if as_json(saved["param_groups"]) != as_json(live_groups):
        return "optimizer hyperparameters or parameter groups differ"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved["state"].items():
        if not 0 <= index < len(params):
            return f"optimizer state for parameter {index}, the optimizer has {len(params)}"
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                return (f"optimizer {key} of parameter {index} is {tuple(value.shape)}, "
                        f"the parameter {tuple(params[index].shape)}")
    return None


def _extra_mismatch(saved: Mapping[str, Mapping[str, ExtraValue]], model: nn.Module) -> str | None:
    live = module_extra_state(model)
    if saved.keys() != live.keys():
        return "modules with training-time state differ"
    for name, values in saved.items():
        if values.keys() != live[name].keys():
            return f"training-time state of {name} differs ({', '.join(sorted(values))})"
    return None


def state_mismatch(state: StepState, model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``state`` cannot be put back into this model and optimizer (None when it fits exactly)."""
    return (_model_mismatch(state.model, model) or _optimizer_mismatch(state.optimizer, optimizer)
            or _extra_mismatch(state.extra, model))


# -- file encoding ---------------------------------------------------------------------------------
def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def standalone_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that each own their whole storage (safetensors refuses shared or partial ones);
    copies only where needed."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        whole = (tensor.is_contiguous() and tensor.storage_offset() == 0
                 and storage.nbytes() == tensor.numel() * tensor.element_size())
        if tensor.numel() and (not whole or storage.data_ptr() in seen):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _split(values: Mapping[str, ExtraValue], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move the tensors of ``values`` into ``tensors`` as ``prefix/key``; the JSON entry lists them and keeps the rest."""
    entry: dict[str, Any] = {"tensors": [], "values": {}}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}/{key}"] = value
            entry["tensors"].append(key)
        else:
            entry["values"][key] = value
    return entry


def _join(entry: Mapping[str, Any], prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, ExtraValue]:
    return {**entry["values"], **{key: tensors[f"{prefix}/{key}"] for key in entry["tensors"]}}


def _rng_fields(rng: RNGState, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors["rng/torch"] = rng.torch_cpu
    for device, state in enumerate(rng.cuda):
        tensors[f"rng/cuda/{device}"] = state
    name, keys, position, has_gauss, cached = rng.numpy
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = rng.python
    return {"cuda_devices": len(rng.cuda), "numpy": [name, int(position), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def _rng_from(fields: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> RNGState:
    name, position, has_gauss, cached = fields["numpy"]
    keys = tensors["rng/numpy"].numpy().astype(np.uint32)
    version, internal, gauss_next = fields["python"]
    cuda = [tensors[f"rng/cuda/{device}"] for device in range(fields["cuda_devices"])]
    return RNGState(tensors["rng/torch"], cuda, (name, keys, position, has_gauss, cached),
                    (version, tuple(internal), gauss_next))


def encode(state: StepState, identity: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of one step file."""
    tensors: dict[str, torch.Tensor] = {f"model/{key}": value for key, value in state.model.items()}
    optimizer = {
        "param_groups": state.optimizer["param_groups"],
        "state": {str(index): _split(values, f"optimizer/{index}", tensors)
                  for index, values in state.optimizer["state"].items()},
    }
    extra = {name: _split(values, f"extra/{name}", tensors) for name, values in state.extra.items()}
    rng = _rng_fields(state.rng, tensors)
    tensors = standalone_tensors(tensors)
    body = {
        "format": FORMAT, "version": VERSION, "step": state.step, "identity": dict(identity),
        "tensors_sha256": tensors_digest(tensors),
        "record": {"losses": state.losses, "auxiliary_losses": state.auxiliary_losses, "loss_before": state.loss_before},
        "optimizer": optimizer, "extra": extra, "rng": rng,
    }
    text = json.dumps(body, sort_keys=True)
    return tensors, {STATE_KEY: text, DIGEST_KEY: text_digest(text)}


def _checked_body(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                  identity: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body after the checksum, format and identity checks."""
    text, digest = metadata.get(STATE_KEY), metadata.get(DIGEST_KEY)
    if text is None or digest is None:
        raise UnusableState("not a qbench step state (no training-state metadata)")
    if text_digest(text) != digest:
        raise UnusableState("metadata checksum mismatch (corrupt file)")
    body = json.loads(text)
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        found = f"format {body.get('format')!r} version {body.get('version')!r}"
        raise UnusableState(f"{found}, expected {FORMAT!r} version {VERSION}")
    if tensors_digest(tensors) != body.get("tensors_sha256"):
        raise UnusableState("tensor checksum mismatch (corrupt file)")
    differing = identity_difference(body.get("identity"), identity)
    if differing:
        raise UnusableState(f"written for another run ({', '.join(differing)} differ)")
    return body


def decode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], identity: Mapping[str, Any],
           total: int) -> StepState:
    """The :class:`StepState` of a step file; :class:`UnusableState` when it fails a check."""
    body = _checked_body(tensors, metadata, identity)
    step, record = body["step"], body["record"]
    if not isinstance(step, int) or not 1 <= step < total:
        raise UnusableState(f"step {step!r} is outside 1..{total - 1}")
    losses, auxiliary = [float(v) for v in record["losses"]], [float(v) for v in record["auxiliary_losses"]]
    if len(losses) != step or len(auxiliary) not in (0, step):
        raise UnusableState(f"the record holds {len(losses)} losses for step {step}")
    optimizer = {"param_groups": body["optimizer"]["param_groups"],
                 "state": {int(index): _join(entry, f"optimizer/{index}", tensors)
                           for index, entry in body["optimizer"]["state"].items()}}
    extra = {name: _join(entry, f"extra/{name}", tensors) for name, entry in body["extra"].items()}
    model = {name[len("model/"):]: tensor for name, tensor in tensors.items() if name.startswith("model/")}
    loss_before = record["loss_before"]
    return StepState(step, model, optimizer, extra, _rng_from(body["rng"], tensors), losses, auxiliary,
                     None if loss_before is None else float(loss_before))


def read_step_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (no pickle); :class:`UnusableState` when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors reports truncation and bad headers with its own error types
        raise UnusableState(f"unreadable safetensors file ({one_line(error)})") from None
    return tensors, metadata


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


# -- where and when --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingCheckpoints:
    """Step checkpoints of one quantization's Light-QAT run.

    ``folder`` holds the single step file (:data:`STATE_FILE`), replaced atomically every ``every_steps``
    optimizer steps while steps remain; ``root`` is the cache root whose ``.partial`` folder stages the writes
    (default: ``folder``). ``on_resume(step, total)`` is called when a run continues from a stored state;
    ``on_discard(reason)`` when a stored state is unusable and ignored (it is deleted; training starts at 0).
    The caller calls :meth:`clear` once the final quantized model is saved elsewhere.
    """

    folder: Path
    every_steps: int = 50
    root: Path | None = None
    on_resume: Callable[[int, int], None] | None = None
    on_discard: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))
        if isinstance(self.every_steps, bool) or not isinstance(self.every_steps, int) or self.every_steps < 1:
            raise QbenchError(f"QAT step checkpoints need every_steps >= 1, got {self.every_steps!r}")

    @property
    def path(self) -> Path:
        """The step file."""
        return self.folder / STATE_FILE

    def due(self, step: int, total: int) -> bool:
        """Whether to write the state after optimizer step ``step`` of ``total`` (never after the last)."""
        return step % self.every_steps == 0 and step < total

    def save(self, state: StepState, identity: Mapping[str, Any]) -> Path:
        """Write ``state`` atomically (temporary file in the staging folder, fsync, rename)."""
        tensors, metadata = encode(state, identity)

        def write(temporary: Path) -> None:
            safetensors.torch.save_file(tensors, str(temporary), metadata=metadata)

        return write_atomic_with(self.path, write, root=self.root if self.root is not None else self.folder)

    def load(self, identity: Mapping[str, Any], total: int, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> StepState | None:
        """The stored state of this run if there is a usable one; None when there is none.

        Every check runs here (checksums, format, ``identity``, step within ``total``, model and optimizer
        fit); a state failing any is discarded (:meth:`discard`) rather than raising.
        """
        if not self.path.is_file():
            return None
        try:
            tensors, metadata = read_step_file(self.path)
            state = decode(tensors, metadata, identity, total)
            problem = state_mismatch(state, model, optimizer)
            if problem is not None:
                raise UnusableState(problem)
            return state
        except FileNotFoundError:  # removed since the check (another process cleared it)
            return None
        except UnusableState as error:
            reason = str(error)
        except Exception as error:  # a malformed body: never crash, never use it
            reason = f"malformed step state ({one_line(error)})"
        self.discard(reason)
        return None

    def discard(self, reason: str) -> None:
        """Delete the stored state and report ``reason`` (one line) through ``on_discard``."""
        self.clear()
        if self.on_discard is not None:
            self.on_discard(" ".join(reason.split()))

    def clear(self) -> None:
        """Remove the stored step state (nothing happens when there is none)."""
        remove_path(self.path)
