"""The model a quantizer works on: the float model itself, or a copy that shares what the quantizer may not change.

``qbench eval`` used to hand every quantizer a full deep copy of the FP32 model: a second full model in memory
(P3 of issue 16: peak memory even for the ``fp32`` baseline) and, on the toy model and ViT-B/32, 0.3-0.6 s, most
of it copying the tokenizer's vocabulary. Now (:func:`working_copy`):

* **Baseline family** (``fp32``): no copy at all. The family's contract is that it returns the float model
  unchanged, so the quantized state *is* the FP32 model object (its features are computed once, its
  fingerprints hashed once). A cheap ledger (module tree, tensor identities, storage pointers, autograd
  version counters, ``requires_grad`` flags, hooks) catches a baseline that breaks the contract; writes through
  ``tensor.data`` bypass the version counter and are not caught there (a full hash would cost more than the
  copy it replaces).
* **Visual scope**: a deep copy in which the towers outside the scope (the text tower) share their modules and tensors
  with the float model by reference (copy-on-write at tower granularity: ``copy.deepcopy`` with its memo pre-seeded).
  Modules outside both towers (embeddings, the logit scale) are still copied. Guarded: the shared tower is
  hashed before and after quantization (values, module settings, ``requires_grad``, hooks, attributes) and a
  quantizer that changed it, which would have changed the FP32 reference too, stops the run with a one-line
  error naming it. Training-mode flags of the shared modules are put back (the run evaluates in eval mode).
* **Joint scope** (both towers quantized): a full deep copy.

The tokenizer and the preprocessing transform are never copied: they are pure functions of their input that no
quantizer changes. Checkpoints still save and restore complete models: :func:`qbench.engine.checkpoint.save_checkpoint`
reads every tensor of the quantized model, shared or not.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from qbench.errors import QbenchError

if TYPE_CHECKING:
    from torch import nn

    from qbench.quant.base import Quantizer
    from qbench.quant.spec import Scope
    from qbench.vlm import VLM

BASELINE_FAMILY = "baseline"


@dataclass
class WorkingCopy:
    """The model to hand to a quantizer, what it shares with the float model, and the check to run afterwards."""

    model: "VLM"
    mode: str
    """``same`` (the float model itself), ``shared:<tower>`` (that tower shared by reference) or ``copy``."""
    check: Callable[[], None] = field(default=lambda: None, repr=False)
    """Raises :class:`QbenchError` when the quantizer changed what it shares with the float model."""


def working_copy(fp32: "VLM", quantizer: "Quantizer", scope: "Scope") -> WorkingCopy:
    """What ``quantizer`` gets to quantize in ``scope`` (see the module notes): the float model itself for the
    baseline family, else a deep copy sharing the towers outside ``scope`` (guarded), the tokenizer and the
    preprocessing with ``fp32``."""
    name = quantizer.name
    if quantizer.family == BASELINE_FAMILY:
        before = _ledger(fp32)

        def check_same() -> None:
            """The float model must come back as it went in (a baseline quantizes nothing)."""
            if _ledger(fp32) != before:
                raise QbenchError(f"quantizer {name!r} (family baseline) changed the float model it was given; a baseline "
                                  "must return the model unchanged: have it quantize a copy, or declare another family")

        return WorkingCopy(fp32, "same", check_same)
    # getattr: anything without the VLM layout (a stand-in in a test) gets a plain deep copy
    memo: dict[int, Any] = {id(part): part for part in (getattr(fp32, "tokenizer", None), getattr(fp32, "preprocess", None))
                            if part is not None}
    others = [tower for tower in getattr(fp32, "tower_prefixes", {}) if tower not in scope.towers]
    shared = [(qualified, module) for qualified, module in fp32.model.named_modules()
              if qualified and fp32.tower_of(qualified + ".") in others] if others else []
    if not shared:
        return WorkingCopy(copy.deepcopy(fp32, memo), "copy")
    for _, module in shared:
        memo[id(module)] = module
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                memo[id(tensor)] = tensor
    training = {id(module): (module, module.training) for _, module in shared}
    before = _shared_digest(shared)
    model = copy.deepcopy(fp32, memo)

    def check_shared() -> None:
        """The shared tower must be bit-identical to before; its modules go back to their training flags."""
        for module, flag in training.values():
            module.training = flag
        if _shared_digest(shared) != before:
            raise QbenchError(f"quantizer {name!r} changed the {'+'.join(others)} tower outside its {scope.value} scope "
                              "(which the FP32 reference shares); it must leave towers outside its scope untouched")

    return WorkingCopy(model, f"shared:{'+'.join(others)}", check_shared)


def _shared_digest(modules: list[tuple[str, "nn.Module"]]) -> str:
    """SHA-256 of the shared modules: names, types, settings, attribute names, hooks, and every parameter and buffer
    (bytes, dtype, shape, ``requires_grad``), read from the tensors' memory without copies."""
    import torch

    digest = hashlib.sha256()
    for qualified, module in modules:
        hooks = (len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks),
                 len(getattr(module, "_backward_pre_hooks", {})))
        digest.update(f"{qualified}|{type(module).__qualname__}|{module.extra_repr()}|{sorted(module.__dict__)}|"
                      f"{hooks}".encode())
        for tensor_name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                digest.update(f"{tensor_name}|None".encode())
                continue
            data = tensor.detach()
            data = (data if data.device.type == "cpu" else data.cpu()).contiguous()
            digest.update(f"{tensor_name}|{data.dtype}|{tuple(data.shape)}|{tensor.requires_grad}".encode())
            digest.update(data.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _ledger(vlm: "VLM") -> list[tuple]:
    """A cheap record of the model's state that any in-place change through a tensor, rebinding, module swap,
    hook or ``requires_grad`` change alters (no tensor bytes are read)."""
    entries: list[tuple] = []
    for qualified, module in vlm.model.named_modules(remove_duplicate=False):
        entries.append((qualified, id(module), type(module), tuple(sorted(module.__dict__)), len(module._forward_hooks),
                        len(module._forward_pre_hooks)))
        for tensor_name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            entries.append((tensor_name, None) if tensor is None else
                           (tensor_name, id(tensor), tensor._version, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype,
                            tensor.requires_grad))
    return entries
