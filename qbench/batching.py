"""Batch size and data-loader workers: chosen from the device and memory unless the user sets them, and a
CUDA out-of-memory error during encoding halves the batch and retries instead of ending the run.

Neither value changes what is measured (each image is preprocessed by the same deterministic transform and
encoded independently of its neighbours), so neither enters the configuration hash; both are printed once
per run and recorded in its provenance. At the level of the last float bit a GEMM's result can depend on
its batch shape (kernel choice), which is why the values are recorded at all.

Memory estimate (documented here because the automatic batch size rests on it). An image encoder's peak
activation memory under ``torch.no_grad`` scales with the input tensor: a ViT's residual stream holds
0.25x (B/32) to 1.75x (L/14) as many floats as its ``3 x H x W`` input, a block keeps about 20-40 such
streams alive at its peak (qkv, the attention map, the 4x MLP hidden and its activation, fake-quant
copies of each), and cuBLAS/allocator workspace comes on top. :data:`ACTIVATION_FACTOR` (96) times the
input's float32 bytes covers that with margin: about 58 MiB per image at 224 px, 130 MiB at 336 px.
On CUDA the batch is the largest power of two whose estimate fits in :data:`CUDA_MEMORY_FRACTION` of the
free GPU memory (measured after the float model is on the device; the rest is left for the quantized copy,
the text batches and fragmentation), within :data:`CUDA_BATCH_RANGE`; an estimate that is still too high
is caught by the out-of-memory retry. On the CPU, memory rarely binds and batches beyond a few hundred
images buy no throughput, so the same estimate against :data:`CPU_MEMORY_FRACTION` of the available RAM
is kept within :data:`CPU_BATCH_RANGE`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from qbench.errors import QbenchError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
ACTIVATION_FACTOR = 96
"""Peak encoder memory per image, as a multiple of the preprocessed float32 input's bytes (see above)."""
DEFAULT_IMAGE_SHAPE = (3, 224, 224)
CUDA_MEMORY_FRACTION = 0.5
CPU_MEMORY_FRACTION = 0.25
CUDA_BATCH_RANGE = (1, 1024)
CPU_BATCH_RANGE = (16, 256)
MAX_WORKERS = 8
"""Beyond 8 decoding processes the encoder, not decoding, limits throughput even for large JPEGs."""
MIN_CPUS_FOR_WORKERS = 3
"""With 1-2 usable cores a worker process only competes with the encoder's own threads (measured slower)."""


class Log(Protocol):
    def log(self, message: str) -> None: ...


@dataclass(frozen=True)
class BatchPlan:
    """The image batch size and data-loader workers of one run, and why each was chosen."""

    batch_size: int
    workers: int
    batch_source: str
    workers_source: str

    def describe(self) -> str:
        """One log line: both values and where they came from."""
        return (f"batch size {self.batch_size} ({self.batch_source}), {self.workers} data-loader workers "
                f"({self.workers_source}); neither enters the config hash")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_count(value: Any, option: str, minimum: int, example: int) -> int | None:
    """``auto`` (or nothing) -> ``None``, else an integer >= ``minimum``; anything else is a one-line error."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    text = str(value).strip()
    number = int(text) if text.lstrip("+-").isdigit() else None
    if number is None or number < minimum:
        raise QbenchError(f"bad {option} {value!r}: give an integer >= {minimum}, or 'auto' (the default, chosen for "
                          f"this machine), e.g. {option} {example}")
    return number


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def available_ram() -> int:
    """Bytes of RAM available now: psutil's estimate if installed, else the kernel's free pages (lower)."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def free_memory(device: str) -> tuple[int, str]:
    """Bytes free for activations on ``device`` and what was measured."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), "free GPU memory"
    return available_ram(), "available RAM"


def per_image_bytes(image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE) -> int:
    """The peak-memory estimate of encoding one image of ``image_shape`` (float32; see the module notes)."""
    return ACTIVATION_FACTOR * 4 * math.prod(image_shape)


def auto_batch_size(device: str, image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE, free_bytes: int | None = None) -> int:
    """The largest power of two whose memory estimate fits the device's share, within the device's range."""
    free = free_memory(device)[0] if free_bytes is None else free_bytes
    cuda = device.startswith("cuda")
    fraction, (low, high) = (CUDA_MEMORY_FRACTION, CUDA_BATCH_RANGE) if cuda else (CPU_MEMORY_FRACTION, CPU_BATCH_RANGE)
    fits = int(free * fraction) // per_image_bytes(image_shape)
    power = 1 << (fits.bit_length() - 1) if fits >= 1 else 1
    return max(low, min(high, power))


def auto_workers(device: str = "cpu", cpus: int | None = None) -> int:
    """Decoding processes: none on 1-2 cores; else all cores but one feeding a GPU, half of them beside a
    CPU encoder (which needs the other half for its own threads); at most :data:`MAX_WORKERS`."""
    cpus = available_cpus() if cpus is None else cpus
    if cpus < MIN_CPUS_FOR_WORKERS:
        return 0
    share = cpus - 1 if device.startswith("cuda") else cpus // 2
    return max(1, min(MAX_WORKERS, share))


def image_shape_of(preprocess: Callable) -> tuple[int, ...]:
    """The tensor shape ``preprocess`` makes of an image (one blank image is transformed to find out)."""
    from PIL import Image

    try:
        return tuple(preprocess(Image.new("RGB", (256, 256))).shape)
    except Exception:  # an unusual transform: fall back to the common CLIP input
        return DEFAULT_IMAGE_SHAPE


def plan_batching(device: str, batch_size: int | None, workers: int | None,
                  image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE) -> BatchPlan:
    """The run's batch size and workers: the user's values where given, else chosen from the device."""
    if batch_size is None:
        free, what = free_memory(device)
        batch_source = (f"auto: {free / 2**30:.1f} GiB {what}, ~{per_image_bytes(image_shape) / 2**20:.0f} MiB per "
                        f"{'x'.join(map(str, image_shape))} image")
        batch_size = auto_batch_size(device, image_shape, free)
    else:
        batch_source = "--batch-size"
    workers_source = f"auto: {available_cpus()} usable cores" if workers is None else "--workers"
    workers = auto_workers(device) if workers is None else workers
    return BatchPlan(batch_size, workers, batch_source, workers_source)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) allocation failure, which a smaller batch may avoid."""
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


class AdaptiveBatch:
    """An encoding batch size that halves when the device runs out of memory, for the rest of the run.

    :meth:`apply` runs ``encode`` over consecutive slices of a batch; a slice that fails with an
    out-of-memory error is retried in halves, and slices already encoded are kept.
    """

    def __init__(self, size: int, log: Log | None = None, what: str = "image") -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.initial = size
        self.size = size
        self.log = log
        self.what = what
        self.retries = 0

    def apply(self, encode: Callable[["torch.Tensor"], "torch.Tensor"], items: "torch.Tensor") -> "torch.Tensor":
        """``encode(items)`` as the concatenation of ``encode`` over slices of at most :attr:`size` rows."""
        import torch

        outputs, start = [], 0
        while start < len(items):
            piece = items[start:start + self.size]
            failure = self._attempt(encode, piece, outputs)
            if failure is None:
                start += len(piece)
            else:
                self._shrink(len(piece), failure)  # outside the except block: the error's frames are freed first
        return torch.cat(outputs)

    @staticmethod
    def _attempt(encode: Callable, piece: "torch.Tensor", outputs: list) -> str | None:
        """Encode ``piece`` into ``outputs``; the first line of an out-of-memory error instead of raising it."""
        try:
            outputs.append(encode(piece))
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            return str(error).splitlines()[0] if str(error) else type(error).__name__
        return None

    def _shrink(self, attempted: int, reason: str) -> None:
        """Halve the size below ``attempted`` rows, free the CUDA cache, and say so once per new size."""
        import torch

        if attempted <= 1:
            raise QbenchError(f"out of memory encoding one {self.what} at a time ({reason[:120]}); free the device "
                              f"or run with --device cpu (this run started at --batch-size {self.initial})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.size = max(1, min(self.size, attempted) // 2)
        self.retries += 1
        if self.log is not None:
            self.log.log(f"out of memory encoding {attempted} {self.what}s at once; retrying that batch in halves "
                         f"and encoding {self.size} at a time for the rest of the run")

    def to_dict(self) -> dict[str, int]:
        return {"initial": self.initial, "final": self.size, "oom_retries": self.retries}
