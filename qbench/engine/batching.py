"""Batch size and data-loader workers: chosen from the device and memory unless the user sets them, and a
CUDA out-of-memory error during encoding halves the batch and retries instead of ending the run.

Neither value changes what is measured, so neither enters the configuration hash; both are printed once
per run and recorded in its provenance. Each image is preprocessed by the same deterministic transform, and
the image towers run in forward passes cut at fixed positions of each split, :func:`numeric_batch` images each
(:data:`NUMERIC_BATCH` on the CPU at 224 px and above, more for small inputs, :data:`CUDA_NUMERIC_BATCH` on a
GPU; the first pass :data:`LEADING_CHUNK`, the last one whatever is left)
whatever the batch size (:class:`FixedChunks`): a GEMM's last float bits depend on its batch shape (the
kernel and blocking chosen for it), so encoding in memory-sized batches made features, and ECE/NLL at ~1e-9,
depend on the free memory. The batch size now only sets how many images are decoded, and so how many passes
run, at a time; only an out-of-memory retry (recorded) changes a pass.

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
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

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
NUMERIC_BATCH = 32
"""Images per forward pass of every image encoding on the CPU at 224 px and above (evaluation features, the dropout
probe, logit-tuning proxies; smaller inputs: :data:`CPU_NUMERIC_PIXELS`), whatever the batch plan: the fixed pass shape that makes features bitwise identical for
every ``--batch-size`` (:class:`FixedChunks`). Measured on the toy model (MKL, AVX-512): passes of 1-2 images
round differently from passes of 4 or more, and with 2 threads passes of 5-11 images differ from 1 thread;
passes of 32 agree for 1, 2 and 4 threads. Throughput against one pass per memory-sized batch of 256
(``benchmarks/perf/numeric_batch.py``, interleaved, busy 2-core machine): 1 thread 1.09x (toy) and 1.11x
(ViT-B-32, 224 px); 2 threads 0.73x and 0.92x (64-image passes: 0.89x and 0.97x)."""
CPU_NUMERIC_PIXELS = NUMERIC_BATCH * 224 * 224
"""Pixels per CPU pass up to which :func:`numeric_batch` doubles the pass: small inputs (32 px toy images) run in
larger passes, because there a pass's fixed cost (Python dispatch of every module, the fake-quant bookkeeping of a
quantized state) outweighs its arithmetic. Measured on the toy model, W8A8 MinMax, one thread, interleaved
(``benchmarks/perf/p2.py``'s bare passes): passes of 32, 64, 128, 256 rows took 1.16x, 1.00x, 0.96x, 0.97x the
time of one pass per 256-image batch. The toy model's FP32 features were bitwise equal for passes of 32, 64, 128 and
256 rows at 1, 2 and 4 threads, and its W8A8 MinMax, SmoothQuant and QuaRot features for passes of 32 and 128 rows at
1 and 2 threads (this machine: MKL, AVX-512)."""
CPU_NUMERIC_MAX = 128
"""The largest CPU pass :func:`numeric_batch` chooses (rows)."""
CUDA_NUMERIC_BATCH = 256
"""The same on a GPU, which needs larger passes to stay busy (the device is part of the config hash). A GPU
without room for it falls back to smaller passes (:meth:`AdaptiveBatch.apply_chunk`), recorded in provenance."""
LEADING_CHUNK = 32
"""Images in the first pass of every evaluation split (:func:`qbench.engine.features.encode_dataset`): the
distinct-value verification of ``qbench eval`` records its kernels on that very pass of the quantized state
(``VERIFICATION_BATCH`` images, :func:`qbench.engine.evaluate.run`) instead of a pass of its own. Equal to
:data:`NUMERIC_BATCH`, so CPU passes are cut as before; on a GPU the first pass is smaller than the others. A
fixed position of the stream like every other cut, so features stay independent of the batch size."""
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
    memory_source: str | None = None
    """The memory measurement an automatic batch size read (:func:`memory_source`); None for ``--batch-size``."""

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
    """Bytes of RAM available now: psutil's ``available`` (free pages plus the page cache the kernel can reclaim).

    Not the kernel's free pages: on a shared machine the page cache keeps those near zero and they swing with
    other jobs (0.6 GiB seen where 17 GiB was available), so identical runs got different batch sizes.
    """
    try:
        import psutil
    except ImportError:  # a declared dependency; only a broken install lacks it
        raise QbenchError("the automatic batch size needs psutil, a qbench dependency: 'pip install psutil', "
                          "or pass --batch-size N") from None
    return int(psutil.virtual_memory().available)


RAM_SOURCE = "psutil.virtual_memory().available"
CUDA_MEMORY_SOURCE = "torch.cuda.mem_get_info (free)"


def memory_source(device: str) -> str:
    """Which measurement :func:`free_memory` reads on ``device`` (recorded in :meth:`BatchPlan.to_dict`)."""
    return CUDA_MEMORY_SOURCE if device.startswith("cuda") else RAM_SOURCE


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
    source = None
    if batch_size is None:
        free, what = free_memory(device)
        source = memory_source(device)
        batch_source = (f"auto: {free / 2**30:.1f} GiB {what}, ~{per_image_bytes(image_shape) / 2**20:.0f} MiB per "
                        f"{'x'.join(map(str, image_shape))} image")
        batch_size = auto_batch_size(device, image_shape, free)
    else:
        batch_source = "--batch-size"
    workers_source = f"auto: {available_cpus()} usable cores" if workers is None else "--workers"
    workers = auto_workers(device) if workers is None else workers
    return BatchPlan(batch_size, workers, batch_source, workers_source, source)


def numeric_batch(device: str, image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE) -> int:
    """Rows per fixed-shape forward pass on ``device`` for images of ``image_shape``: :data:`CUDA_NUMERIC_BATCH` on a
    GPU; on the CPU :data:`NUMERIC_BATCH`, doubled while a pass stays within :data:`CPU_NUMERIC_PIXELS` and
    :data:`CPU_NUMERIC_MAX` rows (128 for 32 px toy images, 32 for 224 px and larger inputs).

    A function of the device and the model's input shape only, so features stay the same for every batch size."""
    if str(device).startswith("cuda"):
        return CUDA_NUMERIC_BATCH
    pixels = max(1, math.prod(image_shape[-2:]))
    rows = NUMERIC_BATCH
    while rows * 2 <= CPU_NUMERIC_MAX and rows * 2 * pixels <= CPU_NUMERIC_PIXELS:
        rows *= 2
    return rows


def model_numeric_batch(model: Any) -> int:
    """:func:`numeric_batch` for ``model``: its device and the shape its ``preprocess`` makes of an image."""
    preprocess = getattr(model, "preprocess", None)
    shape = image_shape_of(preprocess) if preprocess is not None else DEFAULT_IMAGE_SHAPE
    return numeric_batch(str(getattr(model, "device", "cpu")), shape)


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
        self.chunk: int | None = None
        """Rows of the fixed-shape passes :meth:`apply_chunk` ran (None: only :meth:`apply` was used)."""

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

    def apply_chunk(self, encode: Callable[["torch.Tensor"], "torch.Tensor"], chunk: "torch.Tensor") -> "torch.Tensor":
        """``encode(chunk)`` in one forward pass, whatever :attr:`size` the memory estimate gave, so the pass has
        the fixed numeric shape (:class:`FixedChunks`); after an out-of-memory error in this run, in slices like
        :meth:`apply` (the retry is recorded in provenance: only then can the last float bits differ)."""
        self.chunk = len(chunk)
        if self.retries == 0:
            outputs: list = []
            failure = self._attempt(encode, chunk, outputs)
            if failure is None:
                return outputs[0]
            self.size = len(chunk)
            self._shrink(len(chunk), failure)
        return self.apply(encode, chunk)

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
        record = {"initial": self.initial, "final": self.size, "oom_retries": self.retries}
        return record if self.chunk is None else {**record, "numeric_batch": self.chunk}


class FixedChunks:
    """Encodes a stream of batches (images or token rows) in forward passes cut at fixed positions of the stream.

    Why: a row's embedding must not depend on the memory-chosen batch size, yet a forward pass's rounding
    depends on its shape. Rows are buffered across the loader's batches and cut at fixed positions of the
    stream, whatever the loader batches were: the first pass takes ``lead`` rows (default ``size``), every later
    pass ``size`` rows, so pass ``k >= 1`` holds rows ``lead + (k-1)*size`` to ``lead + k*size - 1``. The last,
    short chunk either runs at its own size (``pad=False``: deterministic for a given stream, and no forward
    rows are spent on padding) or is padded with zero rows to the full size (``pad=True``, the historical
    behaviour; towers in eval mode treat rows independently) and only its real rows are kept.
    ``on_encoded(n)`` is told the real rows of every completed pass; ``first_pass()``, when given, returns a
    context manager entered around the first pass only (the evaluation's verification records its kernels
    there, :func:`qbench.engine.evaluate.run`).
    """

    def __init__(self, encode: Callable[["torch.Tensor"], "torch.Tensor"], batch: AdaptiveBatch,
                 size: int = NUMERIC_BATCH, on_encoded: Callable[[int], None] | None = None, *,
                 lead: int | None = None, pad: bool = True,
                 first_pass: Callable[[], ContextManager[Any]] | None = None) -> None:
        if size < 1 or (lead is not None and lead < 1):
            raise ValueError(f"chunk sizes must be >= 1, got {size} (first pass {lead})")
        self.encode = encode
        self.batch = batch
        self.size = size
        self.lead = size if lead is None else lead
        self.pad = pad
        self.on_encoded = on_encoded
        self.first_pass = first_pass
        self._passes = 0
        self._pending: list["torch.Tensor"] = []
        self._pending_rows = 0
        self._outputs: list["torch.Tensor"] = []

    def _next_size(self) -> int:
        """Rows of the next full pass: ``lead`` for the first, ``size`` after it."""
        return self.lead if self._passes == 0 else self.size

    def feed(self, rows: "torch.Tensor") -> None:
        """Append ``rows`` to the stream and encode every chunk they complete."""
        import torch

        self._pending.append(rows)
        self._pending_rows += len(rows)
        if self._pending_rows < self._next_size():
            return
        stacked = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        start = 0
        while len(stacked) - start >= self._next_size():
            size = self._next_size()
            self._run(stacked[start:start + size], size)
            start += size
        self._pending = [stacked[start:]] if start < len(stacked) else []
        self._pending_rows = len(stacked) - start

    def finish(self) -> "torch.Tensor":
        """Encode the rest (at its own size, or padded to a full chunk with ``pad``); the outputs of every row
        fed, in order."""
        import torch

        if self._pending_rows:
            rest = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            if self.pad:
                padding = rest.new_zeros((self._next_size() - len(rest), *rest.shape[1:]))
                rest = torch.cat([rest, padding])
            self._run(rest, self._pending_rows)
            self._pending, self._pending_rows = [], 0
        if not self._outputs:
            raise ValueError("no rows were fed to encode")
        return torch.cat(self._outputs)

    def _run(self, chunk: "torch.Tensor", real: int) -> None:
        """One pass; keep the outputs of its ``real`` leading rows. The batch records :attr:`size` as its
        numeric pass size (a short last pass or a smaller first one is not the configured size)."""
        context = self.first_pass() if self._passes == 0 and self.first_pass is not None else nullcontext()
        with context:
            output = self.batch.apply_chunk(self.encode, chunk)
        self.batch.chunk = self.size
        self._passes += 1
        self._outputs.append(output[:real] if real < len(output) else output)
        if self.on_encoded is not None:
            self.on_encoded(real)
