"""CC3M, YFCC and SBU image-caption pairs from local WebDataset tar shards, as calibration proxies (``suites.md`` §5).

Sources (qbench ships no images; users fetch them with img2dataset, Beaumont 2021,
https://github.com/rom1504/img2dataset, and point ``--data-root`` at the shards):

* ``cc3m``: Conceptual Captions (Sharma et al., "Conceptual Captions: A Cleaned, Hypernymed, Image
  Alt-text Dataset For Automatic Image Captioning", ACL 2018), distributed by Google as URL + caption
  lists; the images belong to their owners.
* ``yfcc``: the 15 M English-caption subset of YFCC100M (Thomee et al., "YFCC100M: The New Data in
  Multimedia Research", Communications of the ACM 59(2), 2016), Yahoo/Flickr Creative-Commons media.
* ``sbu``: SBU Captions (Ordonez, Kulkarni & Berg, "Im2Text: Describing Images Using 1 Million
  Captioned Photographs", NeurIPS 2011), a Flickr URL + caption list.

Expected on disk, one layout per source: ``<data root>/<source>/*.tar`` (``cc3m/000000.tar``,
``cc3m/000001.tar``, ...), plain tars in the WebDataset format (https://github.com/webdataset/webdataset):
consecutive members sharing a *key* form one sample, the key being the member path up to the first dot
of its basename (``a/b.c.jpg`` -> key ``a/b``, extension ``c.jpg``). img2dataset writes
``000000123.jpg``, ``000000123.txt`` (caption) and ``000000123.json`` per sample.

Reading is streamed with plain :mod:`tarfile` (mode ``r|``), never with the ``webdataset`` package and
never loading a whole shard: shards are read in name order, and reading stops as soon as the seed's
window is filled. A sample is *valid* when one of its members has an image extension (last
dot-component ``jpg``, ``jpeg``, ``png`` or ``webp``, case-insensitive; the first such member is used)
that PIL decodes, and its caption member (last dot-component ``txt``; the first such) is non-empty
UTF-8 after stripping. Invalid samples are skipped and counted. Seed ``s`` with ``n`` pairs takes the
valid samples at stream positions ``[s*n, (s+1)*n)``: disjoint, reproducible windows. A damaged shard (truncated download, garbage, missing end-of-archive
marker) keeps the samples read completely before the damage, drops the one being read, and is named in
the provenance; the stream goes on with the next shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

from qbench.data import DatasetRequest, ProxyPairs, ProxySpec
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench_plugins.datasets.cifar import resolve_root

if TYPE_CHECKING:  # PIL is imported where samples are decoded: registering the proxy (qbench list) stays cheap
    from PIL import Image

IMAGE_FIELDS: frozenset[str] = frozenset({"jpg", "jpeg", "png", "webp"})
"""Last dot-component of an image member's extension (lower-cased), as in WebDataset's decoders."""
CAPTION_FIELD = "txt"
WEBDATASET_CITATION = "WebDataset format (Breuel et al., https://github.com/webdataset/webdataset)"
IMG2DATASET_CITATION = "img2dataset (Beaumont, 2021, https://github.com/rom1504/img2dataset)"

_KEY_PATTERN = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")
"""``(key, extension)`` of a member path: the split is at the first dot of the basename. Basenames with
no dot or starting with a dot (``._x.jpg`` macOS stubs) do not match and such members are ignored, as
WebDataset's ``base_plus_ext`` ignores them."""

_END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)
_MAX_CORRUPT_NAMED = 3  # shards named in a provenance string before "and K more"


@dataclass(frozen=True)
class ProxySource:
    """One WebDataset proxy source: its registry name, its folder under the data root, what it is."""

    name: str
    folder: str
    description: str

    @property
    def layout(self) -> str:
        """The expected on-disk layout relative to the data root, for error messages."""
        return (
            f"{self.folder}/000000.tar {self.folder}/000001.tar ... (WebDataset shards with key.jpg + key.txt "
            "members, as written by img2dataset)"
        )


SOURCES: tuple[ProxySource, ...] = (
    ProxySource(
        "cc3m", "cc3m",
        "Conceptual Captions 3M image-caption pairs (Sharma et al., ACL 2018) from WebDataset shards <data root>/cc3m/*.tar",
    ),
    ProxySource(
        "yfcc", "yfcc",
        "YFCC100M 15M English-caption subset (Thomee et al., CACM 2016) from WebDataset shards <data root>/yfcc/*.tar",
    ),
    ProxySource(
        "sbu", "sbu",
        "SBU Captions (Ordonez et al., NeurIPS 2011) from WebDataset shards <data root>/sbu/*.tar",
    ),
)


@dataclass(frozen=True)
class ShardSample:
    """One valid sample: where it came from (shard file name, key), its decoded RGB image and caption."""

    shard: str
    key: str
    image: Image.Image
    caption: str


@dataclass
class StreamReport:
    """What streaming saw so far: valid and skipped samples (with reasons), shards opened, damaged shards."""

    valid: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    opened: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skipped_summary(self) -> str:
        """``"2 invalid samples skipped (1 no caption, 1 undecodable image)"`` or ``"no invalid samples"``."""
        if not self.skipped:
            return "no invalid samples"
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{self.n_skipped} invalid sample{'s' if self.n_skipped != 1 else ''} skipped ({reasons})"

    def corrupt_summary(self) -> str:
        """``"; damaged shards: 000002.tar (unexpected end of data)"`` or ``""`` when every shard was intact."""
        if not self.corrupt:
            return ""
        named = [f"{shard} ({why})" for shard, why in list(self.corrupt.items())[:_MAX_CORRUPT_NAMED]]
        more = len(self.corrupt) - len(named)
        return "; damaged shards: " + ", ".join(named) + (f" and {more} more" if more else "")


def split_key(member_path: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member path (``a/b.c.jpg`` -> ``("a/b", "c.jpg")``); ``None`` if it has no key."""
    match = _KEY_PATTERN.match(member_path)
    return (match.group(1), match.group(2)) if match else None


def shard_paths(request: DatasetRequest, source: ProxySource) -> list[Path]:
    """The source's ``*.tar`` shards sorted by file name, or a one-line error naming the expected layout."""
    root = resolve_root(request, source.name, source.layout)
    folder = root / source.folder
    how = f"pass --data-root DIR (or QBENCH_DATA) where DIR holds {source.layout}"
    if not folder.is_dir():
        raise QbenchError(f"proxy {source.name!r} not found: expected shards {folder}/000000.tar ...; {how}")
    shards = sorted(
        (path for path in folder.glob("*.tar") if path.is_file() and not path.name.startswith(".")),
        key=lambda path: path.name,
    )
    if not shards:
        raise QbenchError(f"proxy {source.name!r}: no *.tar shards in {folder}; {how}")
    return shards


def _member_groups(shard: Path, report: StreamReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each run of consecutive members sharing a key, streamed in tar order.

    Damage (a read error, or an archive that ends without its two zero blocks) records the shard in
    ``report.corrupt``; the group being read at that point is dropped and counted as skipped.
    """
    report.opened.append(shard.name)
    key: str | None = None
    files: dict[str, bytes] = {}
    with open(shard, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|") as tar:
                for member in tar:
                    parsed = split_key(member.name) if member.isfile() else None
                    if parsed is None:
                        continue
                    if parsed[0] != key:
                        if key is not None:
                            yield key, files
                        key, files = parsed[0], {}
                    data = _read_member(tar, member)
                    files.setdefault(parsed[1], data)
                end_offset = tar.offset
        except (tarfile.TarError, OSError, EOFError) as error:
            _mark_damaged(shard, report, key, _first_line(error))
            return
        if not _ends_cleanly(handle, end_offset):
            _mark_damaged(shard, report, key, "truncated: no end-of-archive marker")
            return
    if key is not None:
        yield key, files


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The member's bytes; a short read is damage (tarfile may return fewer bytes instead of raising)."""
    extracted: IO[bytes] | None = tar.extractfile(member)
    data = extracted.read() if extracted is not None else b""
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of data in {member.name}")
    return data


def _ends_cleanly(handle: IO[bytes], end_offset: int) -> bool:
    """Whether the archive's end-of-archive marker (two zero blocks) sits where tarfile stopped reading.

    In stream mode tarfile reports a truncation at a header boundary, or a garbled header, as a normal
    end; checking the two blocks at that offset tells a complete shard from a cut one.
    """
    handle.seek(end_offset)
    return handle.read(len(_END_OF_ARCHIVE)) == _END_OF_ARCHIVE


def _mark_damaged(shard: Path, report: StreamReport, pending_key: str | None, why: str) -> None:
    report.corrupt[shard.name] = why
    if pending_key is not None:
        report.skipped["cut by shard damage"] += 1


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text or type(error).__name__


def decode_sample(files: dict[str, bytes]) -> tuple[Image.Image, str] | str:
    """The RGB image and stripped caption of a sample, or why it is invalid (a short reason, for counting)."""
    from PIL import Image

    image_field = next((name for name in files if name.rsplit(".", 1)[-1].lower() in IMAGE_FIELDS), None)
    caption_field = next((name for name in files if name.rsplit(".", 1)[-1].lower() == CAPTION_FIELD), None)
    if image_field is None:
        return "no image"
    if caption_field is None:
        return "no caption"
    try:
        caption = files[caption_field].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "caption not UTF-8"
    if not caption:
        return "empty caption"
    try:
        with Image.open(io.BytesIO(files[image_field])) as opened:
            opened.load()
            image = opened.convert("RGB")
    except MemoryError:
        raise
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return "undecodable image"
    return image, caption


def valid_samples(shards: list[Path], report: StreamReport) -> Iterator[ShardSample]:
    """Every valid sample of the shards in stream order; invalid ones are counted in ``report.skipped``."""
    for shard in shards:
        with contextlib.closing(_member_groups(shard, report)) as groups:
            for key, files in groups:
                decoded = decode_sample(files)
                if isinstance(decoded, str):
                    report.skipped[decoded] += 1
                    continue
                report.valid += 1
                yield ShardSample(shard.name, key, decoded[0], decoded[1])


def take_window(shards: list[Path], start: int, n: int, report: StreamReport) -> list[ShardSample]:
    """The valid samples at stream positions ``[start, start + n)``; stops reading once the window is full.

    Samples before ``start`` are decoded (validity depends on decoding) and dropped at once, so memory
    holds at most the window.
    """
    window: list[ShardSample] = []
    with contextlib.closing(valid_samples(shards, report)) as stream:
        for position, sample in enumerate(stream):
            if position >= start:
                window.append(sample)
                if len(window) == n:
                    break
    return window


def window_fingerprint(window: list[ShardSample]) -> str:
    """SHA-256 (hex) of the ordered ``shard/key`` list, one per line (``suites.md`` §5)."""
    digest = hashlib.sha256()
    for sample in window:
        digest.update(f"{sample.shard}/{sample.key}\n".encode())
    return digest.hexdigest()


def load_webdataset_proxy(source: ProxySource, request: DatasetRequest, n: int) -> ProxyPairs:
    """The seed's window of ``n`` image-caption pairs from ``source``'s shards, with its provenance."""
    if n < 1:
        raise QbenchError(f"bad proxy size {n}: it must be a positive number of image-caption pairs")
    if request.seed < 0:
        raise QbenchError(f"bad seed {request.seed} for proxy {source.name!r}: use a seed >= 0")
    shards = shard_paths(request, source)
    start = request.seed * n
    report = StreamReport()
    window = take_window(shards, start, n, report)
    if len(window) < n:
        raise QbenchError(
            f"proxy {source.name!r}: only {report.valid} valid image-caption pairs in {len(shards)} shards under "
            f"{shards[0].parent} ({report.skipped_summary()}{report.corrupt_summary()}), but seed {request.seed} "
            f"with --proxy-n {n} needs stream positions [{start}, {start + n}); lower --proxy-n (or --seed) or add shards"
        )
    return ProxyPairs(
        source=_source_string(source, request.seed, n, report, len(shards)),
        images=tuple(sample.image for sample in window),
        captions=tuple(sample.caption for sample in window),
        fingerprint=window_fingerprint(window),
    )


def _source_string(source: ProxySource, seed: int, n: int, report: StreamReport, n_shards: int) -> str:
    """Human-readable provenance: source, N, seed, window, skipped count and shards read."""
    return (
        f"{source.name} (WebDataset {source.folder}/*.tar): N={n}, seed={seed}, stream positions "
        f"[{seed * n}, {(seed + 1) * n}), {report.skipped_summary()}, {len(report.opened)} of {n_shards} shards read"
        f"{report.corrupt_summary()}"
    )


def _loader(source: ProxySource):
    """``loader(request, n)`` bound to one source (a named function, so tracebacks say which)."""

    def load(request: DatasetRequest, n: int) -> ProxyPairs:
        return load_webdataset_proxy(source, request, n)

    load.__name__ = load.__qualname__ = f"load_{source.name}_proxy"
    return load


@hookimpl
def qbench_register_proxies() -> list[ProxySpec]:
    return [ProxySpec(name=source.name, description=source.description, loader=_loader(source)) for source in SOURCES]
