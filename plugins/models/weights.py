"""Where a zoo model's weights come from, decided before any library touches the network (``models.md`` §3).

Resolution order, first match wins, and the winner is recorded in the run's provenance:

1. ``--weights PATH`` to a file (a state dict as ``.safetensors``/``.bin``/``.pt``/``.pth``) or a folder
   (a Hub snapshot or ``save_pretrained`` output);
2. the Hugging Face cache, probed with ``huggingface_hub.try_to_load_from_cache`` (a filesystem lookup that
   never opens a connection);
3. a download, only with ``--allow-download`` and when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are unset;
4. otherwise one line naming the model, what was looked for, where, and how to provide it.

Probing first matters: with the files absent and no network, open_clip's own lookup retries two file names
and takes about 46 s per model before failing (measured, ``models.md`` §3.2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qbench.errors import QbenchError

from .zoo import ZooEntry

OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""The names open_clip downloads from a tag's Hub repo, safetensors first."""
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""transformers' ``save_pretrained`` names (ALIGN)."""
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "hf": (("tokenizer.json",),),
    "bert": (("vocab.txt", "tokenizer.json"), ("preprocessor_config.json", "processor_config.json")),
}
"""Files a tokenizer (and, for ALIGN, the image processor) needs besides the weights: one of each group
(the Hub repo's names, or those transformers 5 ``save_pretrained`` writes)."""
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_PROBE_TIMEOUT_S = 5.0
"""How long the one reachability request before a download may take (the Hub libraries retry each file for ~23 s)."""


@dataclass(frozen=True)
class WeightsSource:
    """The resolved origin of a model's weights: ``kind`` is ``file``, ``folder``, ``cache``, ``download`` or
    ``random-init``; ``path`` the weights file or folder (None for download and random init)."""

    kind: str
    path: Path | None = None

    def describe(self) -> str:
        return self.kind if self.path is None else f"{self.kind} {self.path}"


def offline() -> bool:
    """Whether the user forbade network access (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def hub_cache_dir(cache_dir: str | None) -> Path:
    """The Hugging Face hub cache qbench probes: ``--hf-cache``, else huggingface_hub's own default
    (``$HF_HUB_CACHE``, legacy ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_file(repo: str, filenames: tuple[str, ...], cache_dir: str | None) -> Path | None:
    """The first of ``filenames`` present in the cache's snapshot of ``repo`` (no network), else None.

    A repo with no cache folder at all (``models--org--name``, the first thing huggingface_hub's lookup checks)
    is None without importing huggingface_hub's download module (its HTTP stack costs ~0.3 CPU-s, which
    ``qbench list`` would pay for every model that was never downloaded).
    """
    cache = hub_cache_dir(cache_dir)
    if not (cache / f"models--{repo.replace('/', '--')}").is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def weight_filenames(entry: ZooEntry) -> tuple[str, ...]:
    return HF_WEIGHT_FILES if entry.loader == "hf_align" else OPEN_CLIP_WEIGHT_FILES


def cached_weights(entry: ZooEntry, cache_dir: str | None) -> Path | None:
    """The cached weights file of ``entry``'s Hub repo, or None."""
    return cached_file(entry.hf_repo, weight_filenames(entry), cache_dir)


def cached_tokenizer_folder(entry: ZooEntry, cache_dir: str | None) -> Path | None:
    """The cached snapshot folder holding every tokenizer file ``entry`` needs, or None (also None when the
    model needs no files: open_clip's BPE vocabulary ships inside open_clip)."""
    folders = set()
    for alternatives in TOKENIZER_FILES.get(entry.tokenizer, ()):
        found = cached_file(entry.hf_repo, alternatives, cache_dir)
        if found is None:
            return None
        folders.add(found.parent)
    return folders.pop() if len(folders) == 1 else None


def has_tokenizer_files(folder: Path, entry: ZooEntry) -> bool:
    """Whether ``folder`` holds one file of every group ``entry``'s tokenizer needs."""
    return all(any((folder / name).is_file() for name in group) for group in TOKENIZER_FILES[entry.tokenizer])


def available_locally(entry: ZooEntry, cache_dir: str | None = None) -> bool:
    """Weights, and the tokenizer files the model needs, are in the cache (what ``qbench list models`` shows)."""
    if cached_weights(entry, cache_dir) is None:
        return False
    return not entry.needs_tokenizer_files or cached_tokenizer_folder(entry, cache_dir) is not None


def resolve_weights(entry: ZooEntry, weights: str | None, cache_dir: str | None, allow_download: bool,
                    random_init: bool) -> WeightsSource:
    """Where ``entry``'s weights come from, or a one-line :class:`QbenchError` saying how to provide them."""
    if random_init:
        return WeightsSource("random-init")
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            return WeightsSource("file", path)
        if path.is_dir():
            return WeightsSource("folder", path)
        raise QbenchError(
            f"--weights {path} does not exist; pass a state-dict file ({', '.join(STATE_DICT_SUFFIXES)}) or a "
            f"folder holding one (a Hub snapshot of {entry.hf_repo}) for {entry.name!r}"
        )
    found = cached_weights(entry, cache_dir)
    if found is not None:
        return WeightsSource("cache", found)
    if allow_download:
        if offline():
            raise QbenchError(
                f"--allow-download was given but {'/'.join(OFFLINE_VARIABLES)} forbids network access; unset it "
                f"to download {entry.hf_repo}, or pass --weights PATH"
            )
        require_hub(entry)
        return WeightsSource("download")
    raise missing_weights_error(entry, cache_dir)


def hub_endpoint() -> str:
    """The Hugging Face Hub address downloads go to (``$HF_ENDPOINT``, else https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def hub_unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached, or None when it answers (any HTTP status counts as an answer).

    One request without retries, through the proxy variables (``HTTPS_PROXY``) as the Hub libraries use them."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        return " ".join(str(reason).split()) or type(error).__name__


def require_hub(entry: ZooEntry) -> None:
    """Before ``--allow-download`` lets a library fetch ``entry``'s files: one line when the Hub cannot be reached,
    instead of every library's retries and warnings (dozens of lines and ~46 s per model)."""
    endpoint = hub_endpoint()
    problem = hub_unreachable(endpoint)
    if problem is not None:
        raise QbenchError(
            f"--allow-download: cannot reach {endpoint} to download {entry.hf_repo} for {entry.name!r} ({problem}); "
            f"connect this machine to the network, or run 'hf download {entry.hf_repo}' on a connected machine and "
            "copy the cache (--hf-cache DIR), or pass --weights PATH"
        )


def missing_weights_error(entry: ZooEntry, cache_dir: str | None) -> QbenchError:
    """The one line of ``models.md`` §3.3: the model, the loader id, the repo, the cache, the fixes."""
    what = f"{entry.loader.replace('hf_align', 'transformers')} {entry.arch}:{entry.pretrained}"
    return QbenchError(
        f"weights for {entry.name!r} ({what}, repo {entry.hf_repo}) are not in the Hugging Face cache "
        f"({hub_cache_dir(cache_dir)}); run 'hf download {entry.hf_repo}' on a connected machine and copy the "
        "cache (or point --hf-cache at it), pass --weights PATH, or add --allow-download where the network is reachable"
    )


def tokenizer_folder(entry: ZooEntry, source: WeightsSource, cache_dir: str | None, allow_download: bool) -> str | None:
    """Where ``entry``'s tokenizer files are: the ``--weights`` folder when it has them, else the cache, else the
    Hub id when downloads are allowed; None for models whose tokenizer ships with open_clip."""
    if not entry.needs_tokenizer_files:
        return None
    needed = [" or ".join(group) for group in TOKENIZER_FILES[entry.tokenizer]]
    if source.kind == "folder" and has_tokenizer_files(source.path, entry):
        return str(source.path)
    cached = cached_tokenizer_folder(entry, cache_dir)
    if cached is not None:
        return str(cached)
    if allow_download and not offline():
        require_hub(entry)
        return entry.hf_repo
    where = f"the Hugging Face cache ({hub_cache_dir(cache_dir)})"
    if source.kind == "folder":
        where = f"the --weights folder {source.path} or {where}"
    raise QbenchError(
        f"the tokenizer of {entry.name!r} needs {' and '.join(needed)} from {entry.hf_repo}, not found in {where}; "
        f"run 'hf download {entry.hf_repo}' on a connected machine and copy the cache, or pass --weights with a "
        "snapshot folder of that repo"
    )


def state_dict_file(folder: Path, entry: ZooEntry) -> Path:
    """The weights file inside a ``--weights`` folder: the Hub names first, else the only state-dict file."""
    for name in OPEN_CLIP_WEIGHT_FILES + HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in STATE_DICT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    looked = ", ".join(OPEN_CLIP_WEIGHT_FILES + HF_WEIGHT_FILES)
    found = f"{len(candidates)} candidate files" if candidates else "no state-dict file"
    raise QbenchError(
        f"--weights folder {folder} holds {found} for {entry.name!r}; expected one of {looked} "
        "(or a single .safetensors/.bin/.pt file): pass the file itself with --weights FILE"
    )
