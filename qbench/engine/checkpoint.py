"""Quantized checkpoints: a quantized model saved as safetensors plus JSON, restored without unpickling.

``qbench quantize … --out DIR`` writes two files:

* ``model.safetensors`` — every parameter and buffer of the quantized model (weights, LSQ steps, scales
  and zero points, rotation matrices, IRM statistics, …), each tensor once, plus the quantizer's artifacts
  (tensors it keeps beside the deployed model, e.g. a LoRA method's factors before their merge);
* ``qbench-checkpoint.json`` — the quantization configuration and its hash, the quantizer's provenance and
  verification, a fingerprint of the float model it was made from, the SHA-256 of the tensors, and the
  *structure*: what the quantizer changed in the float model's module tree.

Integrity: one manifest hash seals both files. ``state.sha256`` in the JSON is a SHA-256 over every stored
tensor's name, dtype, shape and bytes (:func:`qbench.engine.integrity.tensors_digest`); the *manifest hash* is the
SHA-256 of the whole JSON document in canonical form (sorted keys, no whitespace; everything but the
``manifest`` field that repeats it: config and bits, verification, per-module structure records, the
tensors' SHA-256), and it is stored in the safetensors metadata of ``model.safetensors``
(:data:`MANIFEST_KEY`), outside the JSON it covers. :func:`read_checkpoint` refuses a JSON whose canonical
hash is not the one the tensor file records (relabelled bits, edited per-module records, a JSON from
another checkpoint); :func:`restore_quantized` refuses tensors whose SHA-256 is not the JSON's, and any
tensor whose shape differs from the float model's slot it fills. Editing either file alone is detected;
whoever rewrites both files and the hashes consistently cannot be stopped by a hash, which is why the
leaderboard trusts numbers it recomputes from per-sample evidence, not checkpoints.

Why a structure record and not a pickle: a quantizer replaces modules (a Linear by a quantized Linear, an
attention by one with separate projections), adds some (quantizers, rotation maps, compensation branches),
changes Python attributes (a quantizer's grid, its mode) and attaches forward hooks. ``torch.save`` would
pickle all of that, and loading a pickle runs arbitrary code. Here, :func:`describe_structure` compares the
quantized tree with the float one and records, for every module that differs (and everything below it), its
class as an importable name, its plain attributes as tagged JSON values, the names of its parameters,
buffers and children, and its forward hooks as ``(owner module, method)`` or module-level function
references. :func:`restore_quantized` rebuilds exactly that on a copy of the float model: classes are
instantiated with ``cls.__new__`` (no constructor runs), attributes are set from JSON, tensors are assigned
from the safetensors file. Only classes and functions from an allow-list of packages resolve: qbench, its
built-in plugins, packages registered in the ``qbench`` entry-point group, and ``nn.Module`` subclasses of
torch / open_clip / timm / transformers. Anything a checkpoint cannot describe (a lambda stored on a module,
an unknown object) is a one-line error at save time, not a broken file.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib
import inspect
import json
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from qbench.atomic import fsync_path, staging_path
from qbench.errors import QbenchError
from qbench.engine.integrity import json_digest, tensors_digest
from qbench.model import VLM
from qbench.quant.base import QuantizedModel

FORMAT = "qbench-quantized-checkpoint"
FORMAT_VERSION = 2
"""Version 2 added the manifest hash (version-1 checkpoints are refused: re-create them with ``qbench quantize``)."""
MANIFEST_KEY = "qbench.manifest.sha256"
"""safetensors metadata key (in ``model.safetensors``) of the manifest hash of ``qbench-checkpoint.json``."""
STATE_FILE = "model.safetensors"
CONFIG_FILE = "qbench-checkpoint.json"
ARTIFACT_PREFIX = "__artifact__/"

TRUSTED_PACKAGES = ("qbench", "qbench_plugins", "qbench_benchmarks")
"""Packages whose classes, dataclasses, enums, plain objects and functions a checkpoint may name."""
MODULE_PACKAGES = ("torch", "open_clip", "timm", "transformers")
"""Libraries whose ``nn.Module`` subclasses (only those) a checkpoint may name."""

_HOOK_DICTS = {
    "forward_pre": ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
    "forward": ("_forward_hooks", "_forward_hooks_with_kwargs"),
}
_UNSUPPORTED_HOOKS = ("_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                      "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class StructureError(QbenchError):
    """The quantized model holds something a checkpoint cannot describe, or a record cannot be restored."""


# -- names -----------------------------------------------------------------------------------------
def qualified_name(obj: Any) -> str:
    """``module:QualName`` of a class or function."""
    return f"{obj.__module__}:{obj.__qualname__}"


def _plugin_packages() -> tuple[str, ...]:
    """Top-level packages of installed ``qbench`` entry-point plugins (third-party quantizers)."""
    from importlib.metadata import entry_points

    from qbench.hookspecs import ENTRY_POINT_GROUP

    return tuple(sorted({point.value.split(":")[0].split(".")[0] for point in entry_points(group=ENTRY_POINT_GROUP)}))


def _top_package(module_name: str) -> str:
    return module_name.split(".")[0]


def resolve_name(name: str, kind: str) -> Any:
    """The class/function ``module:QualName`` names, if the allow-list permits it for ``kind``.

    ``kind``: ``module`` (an ``nn.Module`` subclass), ``dataclass``, ``enum``, ``object`` (a plain class) or
    ``function`` (a module-level function). Nothing is called.
    """
    module_name, sep, qualname = str(name).partition(":")
    if not sep or "<" in qualname or not module_name:
        raise StructureError(f"checkpoint names {name!r}, which is not an importable module:QualName")
    package = _top_package(module_name)
    trusted = package in TRUSTED_PACKAGES or package in _plugin_packages()
    if not trusted and not (kind == "module" and package in MODULE_PACKAGES):
        raise StructureError(f"checkpoint names {name!r} ({kind}) from package {package!r}, which is not allowed")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise StructureError(f"checkpoint names {name!r}, which this installation does not have "
                             "(install the plugin package that made it)") from None
    ok = {
        "module": inspect.isclass(obj) and issubclass(obj, nn.Module),
        "dataclass": inspect.isclass(obj) and dataclasses.is_dataclass(obj),
        "enum": inspect.isclass(obj) and issubclass(obj, enum.Enum),
        "object": inspect.isclass(obj) and not issubclass(obj, (nn.Module, enum.Enum, BaseException)),
        "function": inspect.isfunction(obj),
    }[kind]
    if not ok:
        raise StructureError(f"checkpoint names {name!r} as a {kind}, but it is not one")
    return obj


# -- tagged JSON values ----------------------------------------------------------------------------
class _Encoder:
    """Plain Python values to tagged JSON; tensors go to ``tensors`` under generated keys."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.tensors = tensors
        self.where = where
        self.count = 0

    def __call__(self, value: Any, label: str) -> Any:
        if isinstance(value, enum.Enum):  # before str/int: str- and int-valued enums must stay enums
            return {"__enum__": self._name(type(value), label), "value": self(value.value, label)}
        if value is None or isinstance(value, (bool, str, int)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, torch.Tensor):
            key = f"__attr__/{self.where}/{label}/{self.count}"
            self.count += 1
            self.tensors[key] = value.detach()
            return {"__tensor__": key}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"__device__": value.type}
        if isinstance(value, (tuple, torch.Size)):
            return {"__tuple__": [self(item, label) for item in value]}
        if isinstance(value, list):
            return [self(item, label) for item in value]
        if isinstance(value, (set, frozenset)):
            tag = "__frozenset__" if isinstance(value, frozenset) else "__set__"
            return {tag: [self(item, label) for item in sorted(value, key=repr)]}
        if isinstance(value, dict):
            return {"__items__": [[self(key, label), self(item, label)] for key, item in value.items()]}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {field.name: self(getattr(value, field.name), f"{label}.{field.name}") for field in dataclasses.fields(value)}
            return {"__dataclass__": self._name(type(value), label), "fields": fields}
        if isinstance(value, nn.Module):
            raise StructureError(f"{self.where}.{label}: a module held outside the module tree cannot be stored")
        if inspect.isfunction(value):
            return {"__function__": self._name(value, label)}
        if inspect.isclass(type(value)) and hasattr(value, "__dict__") and not callable(value):
            name = self._name(type(value), label)
            return {"__object__": name, "state": {key: self(item, f"{label}.{key}") for key, item in vars(value).items()}}
        raise StructureError(f"{self.where}.{label}: a {type(value).__name__} cannot be stored in a checkpoint")

    def _name(self, obj: Any, label: str) -> str:
        name = qualified_name(obj)
        if "<" in obj.__qualname__:
            raise StructureError(f"{self.where}.{label}: {name} is local (a lambda or closure) and cannot be stored")
        return name


class _Decoder:
    """Tagged JSON back to Python values; tensors from the loaded file."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(item) for item in value]
        if not isinstance(value, dict):
            return value
        if "__float__" in value:
            return float(value["__float__"])
        if "__tensor__" in value:
            return self.tensors[value["__tensor__"]]
        if "__dtype__" in value:
            dtype = getattr(torch, str(value["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise StructureError(f"unknown dtype {value['__dtype__']!r} in checkpoint")
            return dtype
        if "__device__" in value:
            return torch.device(str(value["__device__"]))
        if "__enum__" in value:
            return resolve_name(value["__enum__"], "enum")(self(value["value"]))
        if "__tuple__" in value:
            return tuple(self(item) for item in value["__tuple__"])
        if "__set__" in value:
            return {self(item) for item in value["__set__"]}
        if "__frozenset__" in value:
            return frozenset(self(item) for item in value["__frozenset__"])
        if "__items__" in value:
            return {self(key): self(item) for key, item in value["__items__"]}
        if "__dataclass__" in value:
            cls = resolve_name(value["__dataclass__"], "dataclass")
            instance = cls.__new__(cls)
            for name, item in value["fields"].items():
                object.__setattr__(instance, name, self(item))
            return instance
        if "__function__" in value:
            return resolve_name(value["__function__"], "function")
        if "__object__" in value:
            cls = resolve_name(value["__object__"], "object")
            instance = cls.__new__(cls)
            instance.__dict__.update({key: self(item) for key, item in value["state"].items()})
            return instance
        raise StructureError(f"unknown value tag in checkpoint: {sorted(value)[:3]}")


# -- describing a module tree ----------------------------------------------------------------------
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"_compiled_call_impl"}


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """A module's own attributes that are not parameters, buffers, children or torch bookkeeping."""
    return {key: value for key, value in vars(module).items() if key not in _MODULE_INTERNALS}


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # values whose == is not a bool (arrays) or raises: treat as changed
        return False


def _hook_list(module: nn.Module, kind: str) -> list[tuple[Any, bool]]:
    hooks_attr, kwargs_attr = _HOOK_DICTS[kind]
    hooks, kwargs = getattr(module, hooks_attr), getattr(module, kwargs_attr)
    return [(fn, bool(kwargs.get(handle, False))) for handle, fn in hooks.items()]


def _differs(quantized: nn.Module, original: nn.Module | None) -> bool:
    """Whether ``quantized`` must be recorded: new, another class, other attributes, slots, children or hooks."""
    if original is None or type(quantized) is not type(original):
        return True
    if list(quantized._modules) != list(original._modules):
        return True
    for attr in ("_parameters", "_buffers"):
        mine, theirs = getattr(quantized, attr), getattr(original, attr)
        if list(mine) != list(theirs) or any((mine[k] is None) != (theirs[k] is None) for k in mine):
            return True
    if quantized._non_persistent_buffers_set != original._non_persistent_buffers_set:
        return True
    for kind in _HOOK_DICTS:
        if len(_hook_list(quantized, kind)) != len(_hook_list(original, kind)):
            return True
    mine, theirs = _plain_attributes(quantized), _plain_attributes(original)
    return mine.keys() != theirs.keys() or not all(_same_value(mine[k], theirs[k]) for k in mine)


def _is_under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == prefix or path.startswith(prefix + ".") or prefix == "" for prefix in prefixes)


def describe_structure(original: nn.Module, quantized: nn.Module) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Records of every module of ``quantized`` that differs from ``original`` (and everything below it),
    plus the tensors their attributes hold (see the module docstring)."""
    float_modules = dict(original.named_modules(remove_duplicate=False))
    paths = {id(module): path for path, module in reversed(list(quantized.named_modules(remove_duplicate=False)))}
    records: list[dict[str, Any]] = []
    attr_tensors: dict[str, torch.Tensor] = {}
    recorded: list[str] = []
    aliased: list[str] = []
    for path, module in quantized.named_modules(remove_duplicate=False):
        if _is_under(path, aliased):
            continue
        first = paths[id(module)]
        if first != path:
            records.append({"path": path, "alias_of": first})
            aliased.append(path)
            continue
        if not (_is_under(path, recorded) or _differs(module, float_modules.get(path))):
            continue
        recorded.append(path)
        records.append(_module_record(path, module, paths, attr_tensors))
    return records, attr_tensors


def _module_record(path: str, module: nn.Module, paths: dict[int, str], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    label = path or "<root>"
    for attr in _UNSUPPORTED_HOOKS:
        if getattr(module, attr, None):
            raise StructureError(f"{label}: {attr.strip('_').replace('_', ' ')} cannot be stored in a checkpoint")
    if getattr(module, "_forward_hooks_always_called", None):
        raise StructureError(f"{label}: always-called forward hooks cannot be stored in a checkpoint")
    cls = type(module)
    if "<" in cls.__qualname__:
        raise StructureError(f"{label}: module class {qualified_name(cls)} is local and cannot be stored")
    encode = _Encoder(tensors, label)
    return {
        "path": path,
        "class": qualified_name(cls),
        "training": module.training,
        "attributes": {key: encode(value, key) for key, value in _plain_attributes(module).items()},
        # lists, not mappings: the JSON is written with sorted keys, and child order is execution order
        # for containers such as nn.Sequential
        "parameters": [[name, p is not None] for name, p in module._parameters.items()],
        "buffers": [[name, b is not None] for name, b in module._buffers.items()],
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": [[name, child is not None] for name, child in module._modules.items()],
        "hooks": {kind: [_hook_record(label, fn, kwargs, paths) for fn, kwargs in _hook_list(module, kind)] for kind in _HOOK_DICTS},
    }


def _hook_record(label: str, fn: Any, with_kwargs: bool, paths: dict[int, str]) -> dict[str, Any]:
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module) and id(owner) in paths and inspect.ismethod(fn):
        return {"owner": paths[id(owner)], "method": fn.__func__.__name__, "with_kwargs": with_kwargs}
    if inspect.isfunction(fn) and "<" not in fn.__qualname__:
        return {"function": qualified_name(fn), "with_kwargs": with_kwargs}
    raise StructureError(f"{label}: forward hook {fn!r} is neither a method of a module in the model nor a module-level function")


def model_tensors(root: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer below ``root`` by qualified name, each tensor object once, plus the aliases
    (other names of a shared tensor → its stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None:
                continue
            key = f"{path}.{name}" if path else name
            if key in tensors or key in aliases:
                continue
            if id(tensor) in first:
                aliases[key] = first[id(tensor)]
                continue
            first[id(tensor)] = key
            tensors[key] = tensor.detach()
    return tensors, aliases


# -- rebuilding ------------------------------------------------------------------------------------
def _new_module(record: dict[str, Any], decode: _Decoder) -> nn.Module:
    cls = resolve_name(record["class"], "module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in record["attributes"].items():
        object.__setattr__(module, key, decode(value))
    module.training = bool(record["training"])
    module._parameters = OrderedDict((name, None) for name, _ in record["parameters"])
    module._buffers = OrderedDict((name, None) for name, _ in record["buffers"])
    module._non_persistent_buffers_set = set(record["non_persistent"])
    module._modules = OrderedDict((name, None) for name, _ in record["children"])
    return module


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if name not in parent._modules:
        raise StructureError(f"checkpoint places a module at {path}, which its parent does not have")
    parent._modules[name] = module


def rebuild_structure(root: nn.Module, records: list[dict[str, Any]], decode: _Decoder) -> nn.Module:
    """Apply the structure records to ``root`` (a copy of the float model's module); returns the new root."""
    for record in records:
        path = record["path"]
        if "alias_of" in record:
            _set_child(root, path, root.get_submodule(record["alias_of"]))
            continue
        module = _new_module(record, decode)
        if path == "":
            root = module
        else:
            _set_child(root, path, module)
    for record in records:
        if "alias_of" in record:
            continue
        module = root.get_submodule(record["path"])
        for name, present in record["children"]:
            if present and module._modules.get(name) is None:
                raise StructureError(f"checkpoint structure misses the child {record['path']}.{name}")
        for kind, hooks in record["hooks"].items():
            for hook in hooks:
                fn = (getattr(root.get_submodule(hook["owner"]), hook["method"]) if "owner" in hook
                      else resolve_name(hook["function"], "function"))
                register = module.register_forward_pre_hook if kind == "forward_pre" else module.register_forward_hook
                register(fn, with_kwargs=bool(hook["with_kwargs"]))
    return root


def check_complete(root: nn.Module, records: list[dict[str, Any]]) -> None:
    """Every parameter and buffer slot a record says was filled holds a tensor after :func:`assign_tensors`."""
    for record in records:
        if "alias_of" in record:
            continue
        module = root.get_submodule(record["path"])
        for slots, table, kind in ((record["parameters"], module._parameters, "parameter"),
                                   (record["buffers"], module._buffers, "buffer")):
            missing = [name for name, present in slots if present and table.get(name) is None]
            if missing:
                raise StructureError(f"checkpoint has no tensor for the {kind} {record['path']}.{missing[0]}")


def assign_tensors(root: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                   requires_grad: dict[str, bool]) -> None:
    """Put every stored tensor at its parameter or buffer slot (by assignment: shapes may differ from the
    float template, slots may be empty placeholders); shared tensors become the same object again."""
    placed: dict[str, torch.Tensor] = {}
    for key in list(tensors) + list(aliases):
        source = aliases.get(key, key)
        path, _, name = key.rpartition(".")
        try:
            module = root.get_submodule(path) if path else root
        except AttributeError:
            raise StructureError(f"checkpoint tensor {key} has no module in the rebuilt model") from None
        if name in module._parameters:
            if source not in placed:
                placed[source] = nn.Parameter(tensors[source], requires_grad=requires_grad.get(key, True))
            module._parameters[name] = placed[source]
        elif name in module._buffers:
            placed.setdefault(source, tensors[source])
            module._buffers[name] = placed[source]
        else:
            raise StructureError(f"checkpoint tensor {key} has no parameter or buffer slot in the rebuilt model")


# -- files -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder's description (``qbench-checkpoint.json``); tensors are read by :func:`restore_quantized`."""

    path: Path
    document: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The quantization configuration (model, weights tag, quantizer and its parameters, bits, scope,
        proxy, seed, device) with its ``config_hash``."""
        return self.document["config"]

    @property
    def config_hash(self) -> str:
        return self.document["config"]["config_hash"]

    @property
    def state_sha256(self) -> str:
        """SHA-256 of the stored tensors (names, dtypes, shapes, bytes), sealed by the manifest hash."""
        return self.document["state"]["sha256"]


def manifest_digest(document: dict[str, Any]) -> str:
    """The manifest hash of a checkpoint document: SHA-256 of its canonical JSON without the ``manifest``
    field (which only repeats this hash). It covers the config (bits included), provenance, verification,
    structure records and, through ``state.sha256``, the tensors."""
    return json_digest({key: value for key, value in document.items() if key != "manifest"}, bind=FORMAT)


def _json_form(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` as it reads back from its JSON file (tuples become lists, other values strings), so the
    manifest hash taken at save time is the one a reader recomputes."""
    return json.loads(json.dumps(document, sort_keys=True, default=str))


def float_fingerprint(vlm: VLM) -> dict[str, str]:
    """Hashes of the float model's towers, so a checkpoint is only applied to the model it came from."""
    from qbench.engine.features import tower_fingerprint

    return {tower: tower_fingerprint(vlm, tower) for tower in ("visual", "text")}


def save_checkpoint(
    directory: str | Path,
    float_model: VLM,
    quantized: QuantizedModel,
    config: dict[str, Any],
    *,
    verification: dict[str, Any] | None = None,
    overwrite: bool = False,
    batching: dict[str, Any] | None = None,
    staging_root: Path | None = None,
) -> Checkpoint:
    """Write ``quantized`` to ``directory`` (created; written to a temporary folder first, fsynced and moved into
    place, so an interrupted save never leaves a half checkpoint). ``config`` must carry its ``config_hash``;
    ``batching`` (batch size and workers used, provenance only) is stored beside it, outside the config.
    ``staging_root`` (default: the folder above ``directory``) holds the temporary folder in its ``.partial``
    folder, where :func:`qbench.atomic.remove_orphan_partials` finds it if the writer is killed."""
    from safetensors.torch import save_file

    from qbench import __version__

    target = Path(directory).expanduser()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise QbenchError(f"checkpoint folder {target} is not empty; choose another --out or pass --force to replace it")
    records, attr_tensors = describe_structure(float_model.model, quantized.model.model)
    tensors, aliases = model_tensors(quantized.model.model)
    artifacts = {f"{ARTIFACT_PREFIX}{name}": tensor for name, tensor in quantized.artifacts.items()}
    clash = set(tensors) & set(attr_tensors)
    if clash:
        raise StructureError(f"tensor names collide in the checkpoint: {sorted(clash)[:3]}")
    stored = {key: value.detach().to("cpu").contiguous() for key, value in {**tensors, **attr_tensors, **artifacts}.items()}
    requires_grad = {path + ("." if path else "") + name: p.requires_grad
                     for path, module in quantized.model.model.named_modules(remove_duplicate=False)
                     for name, p in module._parameters.items() if p is not None}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(staging_root if staging_root is not None else target.parent, target.name)
    staging.mkdir()
    try:
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "qbench_version": __version__,
            "config": config,
            "float_fingerprint": float_fingerprint(float_model),
            "quantizer_provenance": quantized.provenance,
            "float_extras": dict(quantized.float_extras),
            "verification": verification,
            "state": {"file": STATE_FILE, "sha256": tensors_digest(stored), "tensors": len(stored),
                      "aliases": aliases, "requires_grad": requires_grad, "artifacts": sorted(quantized.artifacts)},
            "structure": records,
        }
        if batching is not None:
            document["batching"] = batching
        document = _json_form(document)
        manifest = manifest_digest(document)
        document["manifest"] = {"sha256": manifest, "stored_in": f"{STATE_FILE} metadata {MANIFEST_KEY}"}
        save_file(stored, str(staging / STATE_FILE),
                  metadata={"format": FORMAT, "config_hash": str(config["config_hash"]), MANIFEST_KEY: manifest})
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
        for name in (STATE_FILE, CONFIG_FILE):
            fsync_path(staging / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        fsync_path(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if staging_root is None:  # a user's --out folder: leave no empty staging folder beside it
            try:
                staging.parent.rmdir()
            except OSError:
                pass
    return Checkpoint(target, document)


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """The checkpoint description in ``directory``; missing or malformed files are one-line errors."""
    folder = Path(directory).expanduser()
    hint = "make one with 'qbench quantize ... --out DIR'"
    if not folder.is_dir():
        raise QbenchError(f"checkpoint folder {folder} does not exist; {hint}")
    config_path, state_path = folder / CONFIG_FILE, folder / STATE_FILE
    for path in (config_path, state_path):
        if not path.is_file():
            raise QbenchError(f"checkpoint {folder} has no {path.name}; {hint}")
    try:
        document = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QbenchError(f"checkpoint {folder}: {CONFIG_FILE} is not valid JSON ({str(error).splitlines()[0]}); {hint}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise QbenchError(f"checkpoint {folder}: {CONFIG_FILE} is not a qbench quantized checkpoint; {hint}")
    if document.get("format_version") != FORMAT_VERSION:
        raise QbenchError(f"checkpoint {folder} has format version {document.get('format_version')}, this qbench reads "
                          f"version {FORMAT_VERSION}; re-create it with this version's 'qbench quantize'")
    for key in ("config", "state", "structure", "float_fingerprint"):
        if key not in document:
            raise QbenchError(f"checkpoint {folder}: {CONFIG_FILE} lacks '{key}'; {hint}")
    if not isinstance(document["config"], dict) or "config_hash" not in document["config"]:
        raise QbenchError(f"checkpoint {folder}: its config has no config_hash; {hint}")
    check_manifest(folder, document)
    return Checkpoint(folder, document)


def check_manifest(folder: Path, document: dict[str, Any]) -> None:
    """Refuse a checkpoint whose JSON is not the one its tensor file was sealed with (one line naming the file
    and the fix): the canonical hash of ``document`` must equal the manifest hash in ``model.safetensors``'
    metadata and the JSON's own copy of it. Reads only the tensor file's header."""
    from safetensors import safe_open

    fix = "re-create it with 'qbench quantize ... --out DIR'"
    try:
        with safe_open(str(folder / STATE_FILE), framework="pt", device="cpu") as handle:
            sealed = (handle.metadata() or {}).get(MANIFEST_KEY)
    except Exception as error:  # safetensors reports bad headers with its own error types
        raise QbenchError(f"checkpoint {folder}: cannot read {STATE_FILE} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); {fix}") from None
    if sealed is None:
        raise QbenchError(f"checkpoint {folder}: {STATE_FILE} carries no manifest hash; {fix}")
    recorded = document.get("manifest")
    if manifest_digest(document) != sealed or not isinstance(recorded, dict) or recorded.get("sha256") != sealed:
        raise QbenchError(f"checkpoint {folder}: {CONFIG_FILE} does not match the manifest hash sealed in {STATE_FILE} "
                          f"(edited, or from another checkpoint); {fix}")


def restore_quantized(checkpoint: Checkpoint, float_model: VLM, *, record_source: bool = True) -> QuantizedModel:
    """The quantized model of ``checkpoint``, rebuilt on a copy of ``float_model`` (which must be the float
    model the checkpoint was made from). No calibration or training runs; nothing is unpickled.

    ``record_source`` adds the checkpoint's path and hashes to the provenance (``qbench eval --checkpoint``);
    the resume cache of :mod:`qbench.engine.quantized_cache` turns it off, so a resumed evaluation's document equals
    an uninterrupted one's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = checkpoint.path
    document = checkpoint.document
    expected = document["float_fingerprint"]
    actual = float_fingerprint(float_model)
    if actual != expected:
        raise QbenchError(
            f"checkpoint {folder} was made from other weights of {document['config'].get('model')} "
            f"({document['config'].get('weights_tag')}); pass the same --weights it was quantized from"
        )
    state_path = folder / STATE_FILE
    try:
        tensors = load_file(str(state_path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as error:
        raise QbenchError(f"checkpoint {folder}: cannot read {STATE_FILE} ({str(error).splitlines()[0]}); "
                          "re-create it with 'qbench quantize'") from None
    weights = {key: value for key, value in tensors.items() if not key.startswith(("__attr__/", ARTIFACT_PREFIX))}
    try:
        if tensors_digest(tensors) != checkpoint.state_sha256:
            raise QbenchError(f"checkpoint {folder}: {STATE_FILE} does not match its recorded SHA-256 (corrupt or "
                              "replaced); re-create it with 'qbench quantize'")
        check_shapes(float_model.model, weights, document["state"]["aliases"])
    except StructureError as error:
        raise QbenchError(f"checkpoint {folder}: {error}; re-create it with 'qbench quantize'") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise QbenchError(f"checkpoint {folder}: malformed state record ({type(error).__name__}: {error}); "
                          "re-create it with 'qbench quantize'") from None
    device = float_model.device
    tensors = {key: value.to(device) for key, value in tensors.items()}
    weights = {key: tensors[key] for key in weights}
    model = copy.deepcopy(float_model)
    try:
        model.model = rebuild_structure(model.model, document["structure"], _Decoder(tensors))
        artifacts = {name: tensors[f"{ARTIFACT_PREFIX}{name}"] for name in document["state"].get("artifacts", [])}
        assign_tensors(model.model, weights, document["state"]["aliases"], document["state"].get("requires_grad", {}))
        check_complete(model.model, document["structure"])
    except StructureError as error:
        raise QbenchError(f"checkpoint {folder}: {error}") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise QbenchError(f"checkpoint {folder}: malformed structure record ({type(error).__name__}: {error})") from None
    model.eval()
    model.clear_caches()
    provenance = dict(document.get("quantizer_provenance", {}))
    if record_source:
        provenance["checkpoint"] = {"path": str(folder), "config_hash": checkpoint.config_hash, "sha256": checkpoint.state_sha256}
    return QuantizedModel(model, provenance=provenance, float_extras=dict(document.get("float_extras", {})),
                          artifacts=artifacts)


def check_shapes(template: nn.Module, weights: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Refuse a stored parameter or buffer whose shape differs from the float model's tensor of the same name
    (:class:`StructureError` naming the tensor, the expected and the found shape), before anything is built.

    A quantizer keeps every float tensor's shape (quantized weights, folded norms and rotations included);
    what it adds (scales, steps, rotation matrices) has new names and no float counterpart to compare with."""
    expected = {name: tuple(tensor.shape) for name, tensor in
                list(template.named_parameters(remove_duplicate=False)) + list(template.named_buffers(remove_duplicate=False))}
    for key in sorted(set(weights) | set(aliases)):
        tensor = weights.get(aliases.get(key, key))
        if tensor is not None and key in expected and tuple(tensor.shape) != expected[key]:
            raise StructureError(f"tensor {key} has shape {tuple(tensor.shape)}, the model expects {expected[key]}")
