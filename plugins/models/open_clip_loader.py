"""Build open_clip zoo models (CLIP, ConvNeXt-CLIP, SigLIP, CoCa, EVA02, DFN) as :class:`qbench.model.VLM`.

Three things open_clip does not do on its own, and qbench must (``models.md`` §1, §3.3):

* **QuickGELU is an error, not a warning.** open_clip only warns when a config's activation differs from
  the one the tag was trained with, then computes with the wrong one. The loader checks the entry's flag
  against both the architecture config and the tag's pretrained config, and turns open_clip's warning into
  an error as well.
* **Preprocessing follows the tag, not the file.** Loading a state dict from a path leaves open_clip's
  default preprocessing; the loader passes ``force_preprocess_cfg`` from ``get_pretrained_cfg(arch, tag)``
  so SigLIP keeps its 0.5 normalisation and squash resize wherever its weights come from.
* **One line per failure.** A checkpoint of the wrong architecture (strict load), a pickled TorchScript
  archive (refused under ``weights_only=True``) or a missing tokenizer each end in a one-line message.

``depth`` builds the same architecture with fewer blocks (random weights only): native open_clip
transformers get ``layers=depth``; timm trunks are built whole and keep their first ``depth`` blocks (per
stage for ConvNeXt). Offline architecture tests use it to run every zoo model at its real width and input
size in seconds.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Callable

from qbench.errors import QbenchError
from qbench.model import LoadRequest
from qbench.vlm import VLM

from .weights import WeightsSource, resolve_weights, state_dict_file, tokenizer_folder
from .zoo import ZooEntry

PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
_tiny_registered = False


def tiny_config_dir() -> Path:
    """``qbench/model_configs``: the tiny offline architectures of ``models.md`` §5 (tests and demos)."""
    import qbench

    return Path(qbench.__file__).resolve().parent / "model_configs"


def register_tiny_configs() -> None:
    """Make ``qbench-tiny-*`` known to open_clip, once per process (called by the loaders, never at import)."""
    global _tiny_registered
    if _tiny_registered:
        return
    import open_clip

    if "qbench-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(tiny_config_dir())
    _tiny_registered = True


def pretrained_cfg(entry: ZooEntry) -> dict[str, Any]:
    """open_clip's pretrained config of ``entry``'s (arch, tag); a one-line error when open_clip lacks it."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(entry.arch, entry.pretrained)
    if not cfg:
        raise QbenchError(
            f"open_clip {open_clip.__version__} has no pretrained tag {entry.arch}:{entry.pretrained} for "
            f"{entry.name!r}; install an open_clip_torch release that lists it ('python -m pip install -U open_clip_torch')"
        )
    return cfg


def check_quick_gelu(entry: ZooEntry) -> None:
    """The entry's QuickGELU flag must equal the architecture config's and the tag's (``models.md`` §1)."""
    import open_clip

    config = open_clip.get_model_config(entry.arch) or {}
    built_with = bool(config.get("quick_gelu", False))
    trained_with = bool(pretrained_cfg(entry).get("quick_gelu", False))
    if not entry.quick_gelu == built_with == trained_with:
        raise QbenchError(
            f"QuickGELU mismatch for {entry.name!r}: registry says quick_gelu={entry.quick_gelu}, open_clip config "
            f"{entry.arch} builds {built_with}, tag {entry.pretrained} was trained with {trained_with}; the model "
            "would compute with the wrong activation: fix the entry's arch (a '-quickgelu' config or not)"
        )


def forced_preprocess(entry: ZooEntry) -> dict[str, Any]:
    """Mean, std, interpolation and resize mode of the tag, applied whatever the weights' source."""
    cfg = pretrained_cfg(entry)
    return {key: cfg[key] for key in PREPROCESS_KEYS if key in cfg}


def reduced_depth_kwargs(arch: str, depth: int) -> dict[str, Any]:
    """``create_model`` overrides giving every native open_clip transformer of ``arch`` ``depth`` layers."""
    import open_clip

    config = open_clip.get_model_config(arch)
    overrides = {}
    for key in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        tower = copy.deepcopy(config.get(key))
        if tower is None or (key == "vision_cfg" and "timm_model_name" in tower):
            continue
        tower["layers"] = min(depth, tower.get("layers", depth))
        overrides[key] = tower
    return overrides


def truncate_timm_trunk(model: Any, depth: int) -> None:
    """Keep the first ``depth`` blocks of a timm vision trunk (ViT/EVA ``blocks``; each ConvNeXt stage)."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        return
    if hasattr(trunk, "stages"):
        for stage in trunk.stages:
            stage.blocks = stage.blocks[:depth]
    elif hasattr(trunk, "blocks"):
        trunk.blocks = trunk.blocks[:depth]


def create(entry: ZooEntry, source: WeightsSource, request: LoadRequest, arch: str, depth: int | None):
    """The open_clip model with the resolved weights, every failure a one-line :class:`QbenchError`."""
    import open_clip

    if depth is not None and source.kind != "random-init":
        raise QbenchError("a reduced-depth build only takes random weights (random-init)")
    pretrained = {
        "file": lambda: str(source.path),
        "folder": lambda: str(state_dict_file(source.path, entry)),
        "cache": lambda: str(source.path),
        "download": lambda: entry.pretrained,
        "random-init": lambda: None,
    }[source.kind]()
    kwargs = reduced_depth_kwargs(arch, depth) if depth is not None else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="QuickGELU mismatch")
        try:
            model = open_clip.create_model(
                arch, pretrained=pretrained, device=request.device, cache_dir=request.cache_dir,
                force_preprocess_cfg=forced_preprocess(entry), weights_only=True, **kwargs,
            )
        except QbenchError:
            raise
        except Exception as error:  # strict-load mismatch, pickled archive, corrupt file, network
            raise load_failure(entry, pretrained, error) from None
    if depth is not None:
        truncate_timm_trunk(model, depth)
    return model


def load_failure(entry: ZooEntry, pretrained: str | None, error: Exception) -> QbenchError:
    """One line for a failed ``create_model``: which model, which file, what went wrong, what to do."""
    text = str(error)
    first = text.splitlines()[0][:200] if text else type(error).__name__
    where = f"from {pretrained}" if pretrained else "(random init)"
    if "Weights only load failed" in text or "weights_only" in text:
        return QbenchError(
            f"cannot load {entry.name!r} {where}: the file is a pickled object (e.g. OpenAI's original TorchScript "
            f"archive), which qbench does not unpickle; use the Hub conversion ({entry.hf_repo}) or a plain state dict"
        )
    if any(marker in text for marker in ("Missing key", "Unexpected key", "size mismatch")):
        return QbenchError(
            f"checkpoint {pretrained} does not fit {entry.name!r} ({entry.arch}): {first}; pass the weights of this "
            "model (a state dict of the same architecture)"
        )
    return QbenchError(f"cannot load {entry.name!r} {where}: {first}")


def make_tokenizer(entry: ZooEntry, source: WeightsSource, request: LoadRequest, arch: str) -> Callable:
    """open_clip's BPE tokenizer (offline), or SigLIP's Hub tokenizer from the weights folder or the cache."""
    import open_clip

    folder = tokenizer_folder(entry, source, request.cache_dir, request.allow_download)
    if folder is None:
        return open_clip.get_tokenizer(arch)
    from open_clip.tokenizer import HFTokenizer

    config = open_clip.get_model_config(arch)["text_cfg"]
    try:
        return HFTokenizer(folder, context_length=config["context_length"],
                           **config.get("tokenizer_kwargs", {}), cache_dir=request.cache_dir)
    except Exception as error:
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise QbenchError(f"cannot build the tokenizer of {entry.name!r} from {folder}: {first}") from None


def load_open_clip(entry: ZooEntry, request: LoadRequest, *, arch: str | None = None, depth: int | None = None,
                   tokenizer: Callable | None = None) -> VLM:
    """Build ``entry`` as a VLM from the weights :func:`resolve_weights` finds.

    ``arch`` builds another architecture with the entry's weights logic (tests use the tiny configs);
    ``depth`` a reduced-depth random model; ``tokenizer`` replaces the entry's (architecture tests of SigLIP,
    whose real tokenizer needs downloaded files).
    """
    register_tiny_configs()
    if arch is None:
        check_quick_gelu(entry)
    arch = arch or entry.arch
    source = resolve_weights(entry, request.weights, request.cache_dir, request.allow_download,
                             request.random_init or depth is not None)
    text_tokenizer = tokenizer or make_tokenizer(entry, source, request, arch)
    model = create(entry, source, request, arch, depth)
    from qbench.openclip_vlm import open_clip_preprocess, open_clip_vlm

    vlm = open_clip_vlm(model, text_tokenizer, open_clip_preprocess(model), name=entry.name,
                        head_modules=frozenset(entry.head_modules))
    vlm.load_info = {
        "weights_source": source.kind,
        "weights_path": str(source.path) if source.path else None,
        "hf_repo": entry.hf_repo,
        "arch": arch,
        "quick_gelu": entry.quick_gelu,
        "head_modules": list(entry.head_modules),
        **({"depth": depth} if depth is not None else {}),
    }
    return vlm
