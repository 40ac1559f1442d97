"""Task type ``dropout``: the weight-dropout redundancy probe of the FP32 model (``scoring.md`` §4).

A model-level task: each dropped copy of the FP32 model encodes the probe images and is scored zero-shot
(:func:`qbench.engine.spectral_eval.dropout_task_outcome`). Records per rate: ``dropout_accuracy`` and
``dropout_delta`` (single values), and a ``dropout`` document section. The probe depends only on the float
model, the probe images, the task and the seed, not on the quantizer, so its outcome is kept in the feature
cache (JSON, keyed by the FP32 tower fingerprints) and a grid over quantizers and bits runs it once.

Its undropped reference accuracy A_fp is one more probe evaluation (1 of ``1 + rates x repeats``; 1.4 s of 22 s on
the toy model), not a reuse of the run's cached FP32 features, because it is not the same computation: it runs on
the copy with the quantizers' attention rewrite (image features differ from the FP32 model's by up to ~2e-7 on the
toy model), with the probe's own float64 ensemble head over a class-balanced subset, so that rate 0 gives a drop of
exactly 0 (:func:`qbench.analysis.spectral.weight_dropout_probe`). Taking it from the run's features would change
``reference_accuracy`` and every ``dropout_delta``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from qbench.tasks import STAGE_MODEL, TaskOutput, TaskRun, TaskType, identity
from qbench_plugins.tasks.fields import Fail, check_known, flag, names, positive_int, required

DEFAULT_DROPOUT_RATES = (0.05, 0.10, 0.20, 0.30)  # scoring.md §4
DEFAULT_DROPOUT_REPEATS = 3
DEFAULT_DROPOUT_IMAGES = 10000  # scoring.md §4: 10 per class of ImageNet-1k val
TOWERS = ("visual", "text")
DROPOUT_CACHE_FORMAT = "qbench-dropout-v1"


@dataclass(frozen=True)
class DropoutTaskSpec:
    """The probe dataset, dropout rates, repeats per rate, towers, rescaling and probe size."""

    dataset: str
    rates: tuple[float, ...] = DEFAULT_DROPOUT_RATES
    repeats: int = DEFAULT_DROPOUT_REPEATS
    towers: tuple[str, ...] = TOWERS
    rescale: bool = False
    max_images: int = DEFAULT_DROPOUT_IMAGES
    type: str = "dropout"

    @property
    def datasets(self) -> tuple[str, ...]:
        """The one dataset."""
        return (self.dataset,)


class Dropout(TaskType):
    """The FP32 model's weight-dropout redundancy probe."""

    name = "dropout"
    spec = DropoutTaskSpec
    summary = "weight-dropout redundancy probe of the FP32 model (accuracy and relative drop per rate)"
    fields = ("dataset", "rates", "repeats", "towers", "rescale", "max_images")
    stage = STAGE_MODEL

    def parse(self, raw: Mapping[str, Any], fail: Fail) -> DropoutTaskSpec:
        """``dataset``, ``rates`` in [0, 1], ``repeats``, ``towers``, ``rescale``, ``max_images``."""
        required(raw, ("dataset",), self.name, fail)
        rates_raw = raw.get("rates", list(DEFAULT_DROPOUT_RATES))
        if not isinstance(rates_raw, list) or not rates_raw:
            raise fail(f"rates must be a non-empty list of numbers in [0, 1], got {rates_raw!r}")
        rates = []
        for rate in rates_raw:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
                raise fail(f"each dropout rate must be a number in [0, 1], got {rate!r}")
            rates.append(float(rate))
        towers = names(raw.get("towers", list(TOWERS)), "towers", fail)
        check_known(towers, TOWERS, "tower", fail)
        if not towers:
            raise fail("towers must name visual, text or both")
        rescale = flag(raw, "rescale", False, fail)
        return DropoutTaskSpec(str(raw["dataset"]), tuple(rates), positive_int(raw, "repeats", DEFAULT_DROPOUT_REPEATS, fail),
                               towers, rescale, positive_int(raw, "max_images", DEFAULT_DROPOUT_IMAGES, fail))

    def score(self, spec: DropoutTaskSpec, run: TaskRun) -> TaskOutput:
        """The probe's records and section: from the feature cache, else computed (under the cache lock of its
        key, so concurrent runs of one FP32 model probe it once) and cached."""
        from qbench.engine.spectral_eval import dropout_task_outcome

        dataset = run.datasets[spec.dataset]
        key = dropout_key(spec, dataset, run.fp32, run.fingerprints["fp32"], run.seed)
        progress, cache = run.progress, run.cache

        def probe() -> dict[str, Any]:
            progress.log(f"weight-dropout probe on {spec.dataset}: rates {', '.join(map(str, spec.rates))} x "
                         f"{spec.repeats} repeats, {'+'.join(spec.towers)} tower(s)")
            records, section = dropout_task_outcome(spec, run.fp32, dataset, batch_size=run.batch_size,
                                                    workers=run.workers, seed=run.seed, progress=progress)
            cache.put_json(key, {"records": records, "section": section})
            return {"records": records, "section": section}

        outcome, computed = cache.compute_once(key, lambda: cache.get_json(key), probe, progress,
                                               f"the weight-dropout probe on {spec.dataset}")
        if not computed:
            progress.log(f"weight-dropout probe on {spec.dataset}: served from the feature cache (same FP32 model, "
                         "images, task and seed)")
        return TaskOutput([{**identity(run.suite, self.name, spec.dataset), **record} for record in outcome["records"]],
                          {"dropout": [{"suite": run.suite.name, "dataset": spec.dataset, **outcome["section"]}]})


def dropout_key(spec: DropoutTaskSpec, dataset: Any, fp32: Any, prints: tuple[str, str], seed: int) -> str:
    """The feature-cache key of one probe: FP32 tower fingerprints, images, preprocessing, task and seed."""
    text = json.dumps({"format": DROPOUT_CACHE_FORMAT, "towers": list(prints), "dataset": dataset.fingerprint,
                       "n": len(dataset), "preprocess": repr(fp32.preprocess), "task": dataclasses.asdict(spec), "seed": seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
