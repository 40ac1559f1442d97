"""Conformance checks for qbench plugins: what every quantizer, scorer, suite, model and dataset must do.

Each ``check_*`` function takes a registered item (a class or a spec), runs it the way an evaluation would on
tiny offline inputs, and raises :class:`ConformanceError` (an ``AssertionError``) with one readable message
naming the item, what it did and what it must do instead. :class:`ConformanceSkip` means a check could not run
for a reason that is not the plugin's fault (a scorer that skips itself without a resource, a model without a
random-init build); everything checked before it passed.

qbench's own tests and the ``pytest --qbench-conformance`` plugin (:mod:`qbench.testing.pytest_plugin`) call
these same functions; a plugin author may also call them from their own tests, e.g. with a
``ScoreContext`` that carries the resources their scorer needs::

    from qbench.testing import check_scorer
    check_scorer(MyScorer, context=ScoreContext(..., resources=ScorerResources(my_lexicon=path)))

Properties checked:

* **quantizers** (:func:`check_quantizer`): a ``Quantizer`` subclass with a known family, citation, one-line
  summary and typed config defaults; unknown parameters are one-line errors; at w8a8 and w4a8 (visual) and
  w8a8 (joint) the quantized model passes verification against the run's bit spec (at most 2^b distinct values
  per group of every tensor a kernel consumes, declared bits equal to the spec's), its embeddings are finite
  and its provenance is a dict; the calibration data are not modified and a method that needs data says so in
  one line when it gets none; the same seed gives the same model; a checkpoint round trip rebuilds it exactly.
* **scorers** (:func:`check_scorer`): declaration and config validation as above; on the constructed case of
  :func:`qbench.testing.data.scorer_case`, with ``plan``/``prepare``/``score`` run as an evaluation runs them,
  one finite float64 score per image, identical scores from a second run and from a fresh instance, scores
  that do not depend on which other images are scored with them, and AUROC(ID vs OOD) > 0.5 (higher = more
  in-distribution).
* **suites** (:func:`check_suite`): a name, a positive integer version, tasks, and every dataset, scorer and
  task type they name registered.
* **models** (:func:`check_model`): identity fields and a weights tag; ``--weights`` naming a missing file is
  a one-line error; a random-init build (where the loader offers one) encodes images and text into unit
  vectors of the same dimension.
* **datasets** (:func:`check_dataset`): identity fields, a well-formed ``label_fingerprint``; without a data root
  or with an empty one the loader either builds the split (then labels, images and fingerprint are checked,
  and the pinned label fingerprint must match) or fails in one line naming ``--data-root``/``QBENCH_DATA`` or
  the folder it searched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from qbench.errors import QbenchError

if TYPE_CHECKING:  # torch is imported by the checks that run a model, never when this module is imported
    from qbench.data import DatasetSpec
    from qbench.model import ModelSpec, VLM
    from qbench.quant.base import CalibrationData, QuantizedModel
    from qbench.quant.verify import VerificationReport
    from qbench.registry import Registry
    from qbench.scoring import ScoreContext
    from qbench.suites import SuiteSpec
    from qbench.testing.data import ScorerCase

CHECKED_KINDS: tuple[str, ...] = ("quantizers", "scorers", "suites", "models", "datasets")
"""The plugin kinds with a conformance check, in the order the pytest plugin runs them."""
SINGULAR: dict[str, str] = {"quantizers": "quantizer", "scorers": "scorer", "suites": "suite",
                            "models": "model", "datasets": "dataset"}
QUANTIZER_SETTINGS: tuple[tuple[str, str], ...] = (("w8a8", "visual"), ("w4a8", "visual"), ("w8a8", "joint"))
"""(bits, scope) settings every quantizer is verified at."""
CHECKPOINT_SETTINGS: tuple[tuple[str, str], ...] = (("w4a8", "visual"), ("w8a8", "joint"))
"""(bits, scope) settings whose checkpoint round trip is checked."""
DETERMINISM_SETTING: tuple[str, str] = ("w4a8", "visual")
UNKNOWN_PARAMETER = "qbench_conformance_no_such_parameter"
DATASET_ROLES: tuple[str, ...] = ("id", "ood", "shift", "spurious")
DATA_ROOT_HINTS: tuple[str, ...] = ("--data-root", "QBENCH_DATA")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ConformanceError(AssertionError):
    """A plugin broke the qbench contract; the message names the item, the problem and the fix."""


class ConformanceSkip(Exception):
    """A check could not run for a reason outside the plugin's contract; the message says which and why."""


# -- selection ---------------------------------------------------------------------------------------------
def is_builtin(entry: Any) -> bool:
    """Whether a registry entry comes with qbench itself (its ``builtin`` flag, distribution or source)."""
    flag = getattr(entry, "builtin", None)
    if isinstance(flag, bool):
        return flag
    if getattr(entry, "distribution", None) == "qbench":
        return True
    from qbench.plugins import BUILTIN_SOURCE_PREFIX

    return str(getattr(entry, "source", "")).startswith(BUILTIN_SOURCE_PREFIX)


def conformance_entries(registry: "Registry", *, include_builtins: bool = False,
                        kinds: Sequence[str] = CHECKED_KINDS) -> list[tuple[str, Any]]:
    """``(kind, entry)`` of every registered item of ``kinds`` to check: the third-party ones, and the
    built-ins too with ``include_builtins``; in kind order, then by name."""
    return [(kind, entry) for kind in kinds for entry in registry.entries(kind)
            if include_builtins or not is_builtin(entry)]


def entry_id(kind: str, entry: Any) -> str:
    """``quantizer:acme-ptq``: the readable test id of one checked item."""
    return f"{SINGULAR.get(kind, kind)}:{entry.name}"


# -- shared helpers ----------------------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


def expect_one_line_error(call: Callable[[], Any], what: str, situation: str, fix: str = "") -> QbenchError:
    """Run ``call``, which must raise a :class:`QbenchError` with a one-line, non-empty message; return it.

    Returning normally, raising anything else, or a multi-line message is a :class:`ConformanceError` that
    says what happened in ``situation``.
    """
    fix = fix or "raise qbench.errors.QbenchError with one line naming the fix"
    try:
        call()
    except QbenchError as error:
        return one_line(error, what, situation, fix)
    except Exception as error:  # the contract: user errors are one line, never a traceback
        raise ConformanceError(f"{what}: {situation} raised {type(error).__name__}: {_first_line(error)}; {fix} "
                               "instead") from None
    raise ConformanceError(f"{what}: {situation} did not fail; {fix}")


def one_line(error: QbenchError, what: str, situation: str, fix: str = "") -> QbenchError:
    """``error`` itself when its message is one non-empty line, else a :class:`ConformanceError`."""
    message = str(error).strip()
    if not message or "\n" in message:
        fix = fix or "raise qbench.errors.QbenchError with one line naming the fix"
        raise ConformanceError(f"{what}: {situation} raised a QbenchError whose message is "
                               f"{'empty' if not message else 'several lines'} ({str(error)!r}); {fix}") from None
    return error


def _check_text(cls: Any, attribute: str, what: str, one_line: bool = False) -> None:
    """A class attribute that must be a non-empty string (and one line, with ``one_line``)."""
    value = getattr(cls, attribute, None)
    if not isinstance(value, str) or not value.strip():
        raise ConformanceError(f"{what}: class attribute {attribute} must be a non-empty string, got {value!r}")
    if one_line and "\n" in value.strip():
        raise ConformanceError(f"{what}: {attribute} must be one line (qbench list shows it), got {value!r}")


def check_configurable(cls: Any, what: str) -> None:
    """A ``Configurable`` plugin's config contract: a dataclass ``Config`` whose defaults are typed values
    (int, float, str, bool or tuple), ``from_params({})`` giving the defaults, and an unknown parameter a
    one-line :class:`QbenchError` that names it."""
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise ConformanceError(f"{what}: Config must be a frozen dataclass of typed, defaulted fields, got {config!r}")
    try:
        defaults = config()
    except TypeError as error:
        raise ConformanceError(f"{what}: Config() failed ({_first_line(error)}); give every field a default "
                               "(the paper's value)") from None
    for item in dataclasses.fields(config):
        default = getattr(defaults, item.name)
        if not isinstance(default, (int, float, str, bool, tuple)):
            raise ConformanceError(f"{what}: Config.{item.name} has an untyped default {default!r}; use an int, "
                                   "float, str, bool or tuple default so command-line values can be coerced")
    try:
        built = cls.from_params({})
    except Exception as error:
        raise ConformanceError(f"{what}: from_params({{}}) failed ({type(error).__name__}: {_first_line(error)}); "
                               "the defaults must build an instance") from None
    if built.params() != cls.defaults():
        raise ConformanceError(f"{what}: from_params({{}}).params() = {built.params()!r} differs from the defaults "
                               f"{cls.defaults()!r}; params() must return the resolved Config")
    error = expect_one_line_error(lambda: cls.from_params({UNKNOWN_PARAMETER: 1}), what,
                                  f"from_params with the unknown parameter {UNKNOWN_PARAMETER!r}",
                                  "unknown parameters must be one-line QbenchErrors naming them")
    if UNKNOWN_PARAMETER not in str(error):
        raise ConformanceError(f"{what}: the error for an unknown parameter does not name it ({error}); "
                               "say which parameter is unknown")


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the duration of a check, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _folder(folder: str | Path | None) -> Iterator[Path]:
    """``folder`` itself, or a temporary folder removed afterwards."""
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="qbench-conformance-") as made:
        yield Path(made)


# -- quantizers --------------------------------------------------------------------------------------------
def check_quantizer_declaration(cls: Any) -> None:
    """A ``Quantizer`` subclass with a name, a known family, a citation, a one-line summary, boolean
    ``needs_data``/``needs_grad`` and a valid config (:func:`check_configurable`)."""
    from qbench.quant.base import FAMILIES, Quantizer

    what = f"quantizer {getattr(cls, 'name', cls)!r}"
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise ConformanceError(f"{what}: must be a subclass of qbench.quant.base.Quantizer, got {cls!r}")
    _check_text(cls, "name", what)
    if cls.family not in FAMILIES:
        raise ConformanceError(f"{what}: family {cls.family!r} is not one of {', '.join(FAMILIES)}")
    _check_text(cls, "citation", what)
    _check_text(cls, "summary", what, one_line=True)
    for flag in ("needs_data", "needs_grad"):
        if not isinstance(getattr(cls, flag, None), bool):
            raise ConformanceError(f"{what}: {flag} must be True or False, got {getattr(cls, flag, None)!r}")
    check_configurable(cls, what)


def default_model_and_calibration() -> "tuple[VLM, CalibrationData]":
    """The kit's quantizer test bed: :func:`~qbench.testing.models.tiny_vlm` and 16 random proxy pairs."""
    from qbench.testing.data import proxy_batch
    from qbench.testing.models import tiny_vlm

    model = tiny_vlm()
    return model, proxy_batch(model, n=16)


def quantize_for_check(cls: Any, float_model: "VLM", calibration: "CalibrationData", bits: str, scope: str,
                       seed: int = 0) -> "QuantizedModel":
    """Quantize a private copy of ``float_model`` as the engine does (calibration only if ``needs_data``).

    Checks that the result is a ``QuantizedModel`` with a dict provenance and that the calibration tensors
    were left unchanged (a quantizer must not write into the data it is given).
    """
    import torch

    from qbench.quant.base import QuantizedModel
    from qbench.quant.spec import BitSpec, Scope

    what = f"quantizer {cls.name!r}"
    images, tokens = calibration.images.clone(), calibration.tokens.clone()
    quantizer = cls()
    data = calibration if cls.needs_data else None
    result = quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse(bits), Scope.parse(scope), data, seed)
    if not torch.equal(calibration.images, images) or not torch.equal(calibration.tokens, tokens):
        raise ConformanceError(f"{what}: quantize() modified the calibration images or tokens it was given; "
                               "work on copies")
    if not isinstance(result, QuantizedModel):
        raise ConformanceError(f"{what}: quantize() returned {type(result).__name__}, not a QuantizedModel")
    if not isinstance(result.provenance, dict):
        raise ConformanceError(f"{what}: QuantizedModel.provenance must be a dict, "
                               f"got {type(result.provenance).__name__}")
    return result


def verify_against_spec(cls: Any, model: "VLM", float_extras: dict[str, str], calibration: "CalibrationData",
                        bits: str, scope: str) -> "VerificationReport":
    """Verify ``model`` with the run's bit spec and quantizer and hold every entry to the spec: declared and
    expected bits equal the spec's (the pixel-reading layer: the layout's first-layer bits), at least 2 and at
    most 2^b distinct values per group, and every attention slot at the spec's activation bits and fired."""
    from qbench.quant.spec import BitSpec, Scope
    from qbench.quant.verify import verify_quantized

    what = f"quantizer {cls.name!r} at {bits} {scope}"
    spec = BitSpec.parse(bits)
    report = verify_quantized(model, calibration.images[:4], calibration.tokens[:4], Scope.parse(scope).towers,
                              float_extras=float_extras, expect_quantized=cls.family != "baseline",
                              bits=spec, quantizer=cls())
    if not report.passed:
        raise ConformanceError(f"{what}: verification failed: {'; '.join(report.problems)}")
    expected = report.expected
    if expected["bits"] != bits:
        raise ConformanceError(f"{what}: the verification plan is for {expected['bits']}, not the run's {bits}")
    first_bits = expected["first_layer_bits"]
    for check in report.modules:
        first = first_bits is not None and check.name in expected["first_layers"]
        weight_bits = first_bits if first else spec.weight_bits
        act_bits = (first_bits if first else spec.act_bits) if spec.quantizes_activations else spec.act_bits
        if (check.weight_bits, check.expected_weight_bits) != (weight_bits, weight_bits):
            raise ConformanceError(f"{what}: module {check.name} declares weight bits {check.weight_bits} "
                                   f"(expected {check.expected_weight_bits}), the spec says {weight_bits}")
        if (check.act_bits, check.expected_act_bits) != (act_bits, act_bits):
            raise ConformanceError(f"{what}: module {check.name} declares activation bits {check.act_bits} "
                                   f"(expected {check.expected_act_bits}), the spec says {act_bits}")
        if not (2 <= check.weight_max_unique <= 2**weight_bits and check.weight_grid_steps <= 2**weight_bits - 1):
            raise ConformanceError(f"{what}: module {check.name} weights hold {check.weight_max_unique} distinct "
                                   f"values over {check.weight_grid_steps} grid steps per group; {weight_bits} bits "
                                   f"allow 2..{2**weight_bits} values")
        if spec.quantizes_activations and not (2 <= check.act_max_unique <= 2**act_bits and check.act_min_group >= 1):
            raise ConformanceError(f"{what}: module {check.name} inputs hold {check.act_max_unique} distinct values "
                                   f"per group; {act_bits} bits allow 2..{2**act_bits}")
    for slot in report.slots:
        if not (slot.act_bits == slot.expected_act_bits == spec.act_bits and slot.fired):
            raise ConformanceError(f"{what}: attention slot {slot} does not quantize at {spec.act_bits} bits or "
                                   "never fired")
    return report


def check_quantized_model(cls: Any, result: "QuantizedModel", calibration: "CalibrationData", bits: str,
                          scope: str) -> "VerificationReport":
    """A quantization result at (bits, scope): verified against the spec, finite image and text embeddings."""
    import torch

    from qbench.testing.models import embeddings

    report = verify_against_spec(cls, result.model, result.float_extras, calibration, bits, scope)
    image, text = embeddings(result.model, calibration)
    if not (torch.isfinite(image).all() and torch.isfinite(text).all()):
        raise ConformanceError(f"quantizer {cls.name!r} at {bits} {scope}: the quantized model's embeddings are "
                               "not finite (NaN or inf)")
    return report


def check_quantizer_determinism(cls: Any, float_model: "VLM", calibration: "CalibrationData",
                                first: "QuantizedModel | None" = None) -> None:
    """Two quantizations with the same seed (at :data:`DETERMINISM_SETTING`) embed images identically.

    ``first`` is an existing seed-0 result at that setting (saves one quantization)."""
    import torch

    from qbench.testing.models import embeddings

    bits, scope = DETERMINISM_SETTING
    first = first or quantize_for_check(cls, float_model, calibration, bits, scope)
    second = quantize_for_check(cls, float_model, calibration, bits, scope)
    if not torch.equal(embeddings(first.model, calibration)[0], embeddings(second.model, calibration)[0]):
        raise ConformanceError(f"quantizer {cls.name!r}: two quantizations with seed 0 at {bits} {scope} embed the "
                               "same images differently; draw every random number from the seed argument")


def check_quantizer_checkpoint(cls: Any, float_model: "VLM", calibration: "CalibrationData",
                               result: "QuantizedModel", bits: str, scope: str, folder: str | Path) -> None:
    """Save ``result`` as a checkpoint (safetensors + JSON structure), restore it on the float model, and
    require bit-identical embeddings, the same float extras and a passing verification."""
    import torch

    from qbench.engine.checkpoint import read_checkpoint, restore_quantized, save_checkpoint
    from qbench.testing.models import embeddings

    what = f"quantizer {cls.name!r} at {bits} {scope}"
    target = Path(folder) / "checkpoint"
    save_checkpoint(target, float_model, result, {"config_hash": "conformance", "quantizer": cls.name})
    restored = restore_quantized(read_checkpoint(target), float_model)
    for side, original, rebuilt in zip(("image", "text"), embeddings(result.model, calibration),
                                       embeddings(restored.model, calibration)):
        if not torch.equal(original, rebuilt):
            raise ConformanceError(f"{what}: the model restored from its checkpoint embeds {side}s differently; "
                                   "keep every tensor the quantized model computes with in a parameter or buffer")
    if restored.float_extras != result.float_extras:
        raise ConformanceError(f"{what}: the checkpoint restores float extras {restored.float_extras!r}, "
                               f"not {result.float_extras!r}")
    verify_against_spec(cls, restored.model, restored.float_extras, calibration, bits, scope)


def check_quantizer_calibration(cls: Any, float_model: "VLM") -> None:
    """A method that needs calibration data fails in one line when it gets none (no AttributeError on None)."""
    from qbench.quant.spec import BitSpec, Scope

    if not cls.needs_data:
        return
    expect_one_line_error(
        lambda: cls().quantize(copy.deepcopy(float_model), BitSpec.parse("w8a8"), Scope.VISUAL, None, 0),
        f"quantizer {cls.name!r}", "quantize() without calibration data (needs_data = True)",
        "say in one QbenchError line that calibration data (a proxy) are needed")


def check_quantizer(cls: Any, float_model: "VLM | None" = None, calibration: "CalibrationData | None" = None,
                    folder: str | Path | None = None) -> None:
    """Every quantizer property of the module docstring, on ``float_model`` (default: the tiny CLIP) and
    ``calibration`` (default: 16 random pairs for it); checkpoints are written under ``folder`` (default: a
    temporary folder)."""
    check_quantizer_declaration(cls)
    if float_model is None:
        float_model, default_calibration = default_model_and_calibration()
        calibration = default_calibration if calibration is None else calibration
    if calibration is None:
        from qbench.testing.data import proxy_batch

        calibration = proxy_batch(float_model, n=16)
    check_quantizer_calibration(cls, float_model)
    results = {}
    for bits, scope in QUANTIZER_SETTINGS:
        results[bits, scope] = quantize_for_check(cls, float_model, calibration, bits, scope)
        check_quantized_model(cls, results[bits, scope], calibration, bits, scope)
    check_quantizer_determinism(cls, float_model, calibration, results.get(DETERMINISM_SETTING))
    with _folder(folder) as base:
        for number, (bits, scope) in enumerate(CHECKPOINT_SETTINGS):
            check_quantizer_checkpoint(cls, float_model, calibration, results[bits, scope], bits, scope,
                                       base / f"{number}-{bits}-{scope}")


# -- scorers -----------------------------------------------------------------------------------------------
def check_scorer_declaration(cls: Any) -> None:
    """A ``Scorer`` subclass with a name, a citation, a one-line summary and a valid config; an unknown
    ``from_params`` key is a one-line :class:`QbenchError`."""
    from qbench.scoring import Scorer

    what = f"scorer {getattr(cls, 'name', cls)!r}"
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise ConformanceError(f"{what}: must be a subclass of qbench.scoring.Scorer, got {cls!r}")
    _check_text(cls, "name", what)
    _check_text(cls, "citation", what)
    _check_text(cls, "summary", what, one_line=True)
    check_configurable(cls, what)


@dataclasses.dataclass(frozen=True)
class ScorerRun:
    """One scorer's pass over a :class:`~qbench.testing.data.ScorerCase`: its plan's fingerprint and scores."""

    fingerprint: str
    id_scores: np.ndarray
    ood_scores: np.ndarray
    joint_scores: np.ndarray


def run_scorer(scorer: Any, case: "ScorerCase", context: "ScoreContext") -> ScorerRun:
    """``plan`` -> encode the requested prompt sets -> ``prepare`` -> ``score`` the ID images, the OOD images
    and both together, as an evaluation runs a scorer; every score array is checked (one finite float64 per
    image). :class:`~qbench.scoring.ScorerSkipped` from ``plan`` propagates."""
    from qbench.scoring import ScorerPlan

    what = f"scorer {scorer.name!r}"
    plan = scorer.plan(context)
    if not isinstance(plan, ScorerPlan):
        raise ConformanceError(f"{what}: plan() returned {type(plan).__name__}, not a ScorerPlan")
    for key, prompts in plan.text_sets.items():
        if not isinstance(key, str) or not isinstance(prompts, tuple) or not all(isinstance(p, str) for p in prompts):
            raise ConformanceError(f"{what}: plan() text set {key!r} must be a tuple of prompt strings")
    text = case.text_features(plan)
    prepared = scorer.prepare(text)

    def score(feats: np.ndarray, label: str) -> np.ndarray:
        """Scores of ``feats`` with this run's text features and prepared state, checked."""
        values = scorer.score(case.inputs(feats, text), prepared)
        if not isinstance(values, np.ndarray) or values.dtype != np.float64:
            kind = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
            raise ConformanceError(f"{what}: score() on {label} images returned {kind}; return a float64 numpy "
                                   "array with one score per image")
        if values.shape != (len(feats),):
            raise ConformanceError(f"{what}: score() on {len(feats)} {label} images returned shape {values.shape}; "
                                   f"return one score per image, shape ({len(feats)},)")
        bad = int(np.sum(~np.isfinite(values)))
        if bad:
            raise ConformanceError(f"{what}: score() returned {bad} non-finite score(s) (NaN or inf) of {len(values)} "
                                   f"on {label} images; every score must be a finite number")
        return values

    joint = np.concatenate([case.id_feats, case.ood_feats])
    return ScorerRun(plan.fingerprint(), score(case.id_feats, "ID"), score(case.ood_feats, "OOD"),
                     score(joint, "ID and OOD"))


def check_scorer(cls: Any, context: "ScoreContext | None" = None, case: "ScorerCase | None" = None) -> float:
    """Every scorer property of the module docstring; returns the AUROC of ID vs OOD on the case.

    ``context`` supplies resources, OOD kind and seed (its suite, ID dataset, classes and templates are the
    case's); a scorer that skips itself with it raises :class:`ConformanceSkip` after the declaration checks.
    """
    from qbench.analysis.ood_metrics import auroc
    from qbench.scoring import ScorerSkipped
    from qbench.testing.data import scorer_case

    check_scorer_declaration(cls)
    what = f"scorer {cls.name!r}"
    case = case or scorer_case()
    context = case.context(context)
    try:
        first = run_scorer(cls(), case, context)
    except ScorerSkipped as reason:
        raise ConformanceSkip(f"{what} skipped itself with the kit's context ({reason}); its declaration and config "
                              "passed; check it with check_scorer(cls, context=...) giving the resources it "
                              "needs") from None
    except (ConformanceError, ConformanceSkip):
        raise
    except Exception as error:
        raise ConformanceError(f"{what}: plan/prepare/score failed on the kit's case ({type(error).__name__}: "
                               f"{_first_line(error)})") from None
    instance = cls()
    second, again = run_scorer(instance, case, context), run_scorer(instance, case, context)
    for label, run in (("a fresh instance", second), ("the same instance run twice", again)):
        if run.fingerprint != first.fingerprint:
            raise ConformanceError(f"{what}: plan() requested different prompts with {label}; plans must be "
                                   "deterministic")
        for side in ("id_scores", "ood_scores"):
            if not np.array_equal(getattr(run, side), getattr(first, side)):
                raise ConformanceError(f"{what}: the same inputs gave different scores with {label} "
                                       f"({side.split('_')[0].upper()} images); scores must be deterministic "
                                       "(seed any randomness from the config or context)")
    alone = np.concatenate([first.id_scores, first.ood_scores])
    if not np.allclose(first.joint_scores, alone, rtol=1e-7, atol=1e-12):
        raise ConformanceError(f"{what}: an image's score depends on the other images scored with it (ID and OOD "
                               "scored together differ from scored apart); score each image on its own")
    value = auroc(first.id_scores, first.ood_scores)
    if not value > 0.5:
        raise ConformanceError(f"{what}: AUROC(ID vs OOD) = {value:.3f} <= 0.5 on the kit's case ({case.description}); "
                               "qbench scores are higher = more in-distribution: check the sign of the score")
    return value


# -- suites ------------------------------------------------------------------------------------------------
def check_suite(spec: "SuiteSpec", registry: "Registry") -> None:
    """A named suite with a positive integer version and tasks, whose datasets, scorers and task types are all
    registered in ``registry`` (task types only when the registry has any)."""
    what = f"suite {getattr(spec, 'name', spec)!r}"
    if not isinstance(getattr(spec, "name", None), str) or not spec.name:
        raise ConformanceError(f"{what}: a suite needs a non-empty name")
    version = getattr(spec, "version", None)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConformanceError(f"{what}: version must be a positive integer (bump it when the suite's measurement "
                               f"changes), got {version!r}")
    if not getattr(spec, "tasks", None):
        raise ConformanceError(f"{what}: a suite needs at least one task")
    try:
        datasets, scorers = tuple(spec.datasets), tuple(spec.scorers)
    except Exception as error:  # a task of an unknown type, a malformed task object
        raise ConformanceError(f"{what}: its tasks cannot be read "
                               f"({type(error).__name__}: {_first_line(error)})") from None
    for kind, names in (("datasets", datasets), ("scorers", scorers)):
        known = set(registry.names(kind))
        missing = [name for name in names if name not in known]
        if missing:
            raise ConformanceError(f"{what}: names {SINGULAR[kind]}(s) {', '.join(map(repr, missing))} that no "
                                   f"installed plugin registers (see 'qbench list {kind}'); fix the names or "
                                   "declare the package that provides them as a dependency")
    try:
        task_types = set(registry.names("task_types"))
    except QbenchError:  # a registry without the task-type kind
        task_types = set()
    if task_types:
        for number, task in enumerate(spec.tasks, start=1):
            name = getattr(task, "type", None)
            if name not in task_types:
                raise ConformanceError(f"{what}: task {number} has type {name!r}, which no installed plugin "
                                       "registers (see 'qbench list task_types')")


# -- models ------------------------------------------------------------------------------------------------
def check_model(spec: "ModelSpec", *, build: bool = True, folder: str | Path | None = None) -> None:
    """A model spec's identity fields; a missing ``--weights`` file is a one-line error naming it; and, with
    ``build``, a random-init build whose image and text embeddings are finite unit vectors of one dimension.

    The loader runs offline (``HF_HUB_OFFLINE=1``). A loader without a random-init build (a one-line error for
    ``random_init=True``) raises :class:`ConformanceSkip` once everything else has passed.
    """
    from qbench.model import LoadRequest

    what = f"model {getattr(spec, 'name', spec)!r}"
    for attribute in ("name", "family", "arch", "weights_tag", "description", "citation"):
        value = getattr(spec, attribute, None)
        if not isinstance(value, str) or not value.strip():
            raise ConformanceError(f"{what}: {attribute} must be a non-empty string, got {value!r}")
    if not callable(getattr(spec, "loader", None)):
        raise ConformanceError(f"{what}: loader must be a callable taking a LoadRequest")
    with _folder(folder) as base, _environment(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"):
        available = spec.weights_available()
        if not isinstance(available, bool):
            raise ConformanceError(f"{what}: weights_available() must return True or False, got {available!r}")
        missing = base / "no-such-weights.safetensors"
        error = expect_one_line_error(
            lambda: spec.loader(LoadRequest(weights=str(missing), cache_dir=str(base / "empty-hub-cache"))), what,
            f"loading with --weights {missing} (a file that does not exist)",
            "say in one QbenchError line that the weights file is missing and how to provide it")
        if str(missing) not in str(error) and "--weights" not in str(error):
            raise ConformanceError(f"{what}: the missing-weights error ({error}) names neither the file nor --weights; "
                                   "say which file was looked for")
        if not build:
            return
        try:
            vlm = spec.loader(LoadRequest(random_init=True, cache_dir=str(base / "empty-hub-cache")))
        except QbenchError as reason:
            raise ConformanceSkip(f"{what}: no random-init build offline ({reason}); identity and missing-weights "
                                  "checks passed") from None
    check_vlm(vlm, what)


def check_vlm(vlm: "VLM", what: str = "model") -> None:
    """A :class:`VLM` encodes a preprocessed image batch and a tokenized caption batch into finite, unit-length
    embeddings of the same dimension, with a positive finite logit scale and something to quantize."""
    import torch
    from PIL import Image

    from qbench.model import VLM

    if not isinstance(vlm, VLM):
        raise ConformanceError(f"{what}: the loader returned {type(vlm).__name__}, not a qbench.model.VLM")
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)) for _ in range(2)]
    if vlm.preprocess is None:
        raise ConformanceError(f"{what}: the VLM has no preprocess transform; evaluations need one to read images")
    with torch.no_grad():
        pixels = torch.stack([vlm.preprocess(picture) for picture in pictures])
        image = vlm.encode_image(pixels).float()
        text = vlm.encode_text(vlm.tokenize(["a photo of a cat.", "a drawing of a boat."])).float()
    for side, values in (("image", image), ("text", text)):
        if values.ndim != 2 or values.shape[0] != 2:
            raise ConformanceError(f"{what}: encode_{side} of 2 inputs returned shape {tuple(values.shape)}; "
                                   "return one embedding row per input")
        if not torch.isfinite(values).all():
            raise ConformanceError(f"{what}: encode_{side} returned non-finite values")
        norms = values.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise ConformanceError(f"{what}: encode_{side} rows have norms {norms.tolist()}; return L2-normalised "
                                   "embeddings")
    if image.shape[1] != text.shape[1]:
        raise ConformanceError(f"{what}: image embeddings have {image.shape[1]} dimensions, text embeddings "
                               f"{text.shape[1]}; both towers must project into one joint space")
    scale = vlm.logit_scale
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
        raise ConformanceError(f"{what}: logit_scale must be a positive finite float, got {scale!r}")
    if not any(True for _ in vlm.quantizable_modules(("visual", "text"))):
        raise ConformanceError(f"{what}: no quantizable Linear/Conv2d module in either tower; check tower_prefixes")


# -- datasets ----------------------------------------------------------------------------------------------
def check_dataset(spec: "DatasetSpec", *, folder: str | Path | None = None) -> None:
    """A dataset spec's identity fields and label fingerprint, and its loader with no data root and with an
    empty one: either a valid split (:func:`check_split`) or a one-line :class:`QbenchError` naming the fix."""
    from qbench.data import DatasetRequest

    what = f"dataset {getattr(spec, 'name', spec)!r}"
    for attribute in ("name", "description", "citation"):
        value = getattr(spec, attribute, None)
        if not isinstance(value, str) or not value.strip():
            raise ConformanceError(f"{what}: {attribute} must be a non-empty string, got {value!r}")
    if spec.role not in DATASET_ROLES:
        raise ConformanceError(f"{what}: role {spec.role!r} is not one of {', '.join(DATASET_ROLES)}")
    pinned = spec.label_fingerprint
    if pinned is not None and not (isinstance(pinned, str) and _SHA256.fullmatch(pinned)):
        raise ConformanceError(f"{what}: label_fingerprint must be None or 64 lower-case hex digits "
                               f"(qbench.engine.evidence.label_fingerprint of the labels), got {pinned!r}")
    if not callable(getattr(spec, "loader", None)):
        raise ConformanceError(f"{what}: loader must be a callable taking a DatasetRequest")
    with _folder(folder) as base, _environment(QBENCH_DATA=None):
        empty = base / "empty-data-root"
        empty.mkdir(exist_ok=True)
        for root, hints in ((None, DATA_ROOT_HINTS), (empty, (str(empty), *DATA_ROOT_HINTS))):
            situation = f"loading with {'no data root' if root is None else f'the empty data root {root}'}"
            try:
                split = spec.loader(DatasetRequest(data_root=root))
            except QbenchError as raised:
                error = one_line(raised, what, situation)
                if not any(hint in str(error) for hint in hints):
                    raise ConformanceError(f"{what}: {situation} fails with '{error}', which names none of "
                                           f"{', '.join(hints)}; say where the data must be and how to point qbench "
                                           "at it") from None
                continue
            except Exception as error:
                raise ConformanceError(f"{what}: {situation} raised {type(error).__name__}: {_first_line(error)}; "
                                       "raise a one-line QbenchError naming --data-root and the expected layout "
                                       "instead") from None
            check_split(split, what, pinned)


def check_split(split: Any, what: str, label_fingerprint: str | None = None) -> None:
    """A loaded split: labelled images with in-range integer labels, class names and templates, an RGB first
    image, a stable fingerprint, and the labels the spec pins (when it pins them)."""
    from PIL import Image

    from qbench.data import LabeledImages
    from qbench.engine.evidence import label_fingerprint as fingerprint_of

    if not isinstance(split, LabeledImages):
        raise ConformanceError(f"{what}: the loader returned {type(split).__name__}, not a qbench.data.LabeledImages")
    labels = np.asarray(split.labels)
    if len(split) < 1 or labels.ndim != 1 or len(labels) != len(split):
        raise ConformanceError(f"{what}: the split holds {len(split)} images and labels of shape {labels.shape}; "
                               "give one integer label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConformanceError(f"{what}: labels must be integers, got {labels.dtype}")
    classes = tuple(split.classnames)
    if labels.min() < -1 or labels.max() >= len(classes):
        raise ConformanceError(f"{what}: labels span [{labels.min()}, {labels.max()}] but there are {len(classes)} "
                               "class names; use -1 for unlabelled images and 0..K-1 otherwise")
    texts_ok = all(isinstance(t, str) for t in split.templates)
    if not all(isinstance(name, str) and name for name in classes) or not texts_ok:
        raise ConformanceError(f"{what}: class names and templates must be non-empty strings")
    if classes and not all("{}" in template for template in split.templates):
        raise ConformanceError(f"{what}: every prompt template must hold '{{}}' for the class name")
    image = split.image(0)
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise ConformanceError(f"{what}: image(0) must be an RGB PIL image, got {image!r}")
    first, second = split.fingerprint, split.fingerprint
    if not isinstance(first, str) or not first or first != second:
        raise ConformanceError(f"{what}: fingerprint must be a stable non-empty string, got {first!r} then {second!r}")
    if label_fingerprint is not None and fingerprint_of(labels) != label_fingerprint:
        raise ConformanceError(f"{what}: the loaded labels hash to {fingerprint_of(labels)}, not the pinned "
                               f"label_fingerprint {label_fingerprint}; update the pin or fix the labels")


# -- dispatch ----------------------------------------------------------------------------------------------
def check_entry(kind: str, entry: Any, registry: "Registry", folder: str | Path | None = None) -> None:
    """Run the check of ``kind`` on a registry entry (what the pytest plugin does for each item)."""
    value = entry.value
    if kind == "quantizers":
        check_quantizer(value, folder=folder)
    elif kind == "scorers":
        check_scorer(value)
    elif kind == "suites":
        check_suite(value, registry)
    elif kind == "models":
        check_model(value, folder=folder)
    elif kind == "datasets":
        check_dataset(value, folder=folder)
    else:
        raise ValueError(f"no conformance check for plugin kind {kind!r} (checked: {', '.join(CHECKED_KINDS)})")
