"""The shape of a leaderboard submission: the keys at each level, their JSON types, and how many there may be.

A submission is exactly what ``qbench eval --json`` prints (:func:`qbench.engine.evaluate.run`) plus an optional
``submitter`` and ``evidence`` record. The allowed key sets below are copied from what that code emits today, so
anything else (a field a person added to sway a reviewer, a typo that would otherwise be ignored) is refused.
When ``qbench eval`` gains a field, add it here in the same change; ``tests/test_leaderboard_hostile.py`` fails
on a fresh evaluation document until it is.

Each level is checked by :meth:`Checker.fields`: a missing required key, a key that is not listed, or a value of
the wrong JSON type is one :class:`~qbench.errors.QbenchError` line naming the source and the key path
(``results[3].fp32``). Semantic checks (registered plugins, recomputed numbers) live in
:mod:`qbench.reporting.submission_checks`; the safe parsing that comes before both in :mod:`qbench.engine.safe_json`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from qbench.errors import QbenchError

# -- allowed keys per level, with their JSON type (alternatives joined by "|") -------------------------------------

TOP_LEVEL_FIELDS: dict[str, str] = {
    "config": "object", "provenance": "object", "model": "object", "verification": "object",
    "quantizer_provenance": "object", "datasets": "object", "results": "array", "skipped": "array",
    "scorers": "object", "reliability": "array", "bin_trajectories": "array", "ood_histograms": "array",
    "spectral": "array", "dropout": "array", "encoder_calls": "object", "timing": "object",
}
"""Keys every ``qbench eval --json`` document has (``qbench.engine.evaluate.run``)."""
OPTIONAL_TOP_LEVEL_FIELDS: dict[str, str] = {"logit_tuning": "object", "submitter": "str", "evidence": "object"}
"""``logit_tuning``: runs with ``--logit-tuning``; ``submitter``: added by ``qbench submit``; ``evidence``: the
per-sample evidence file's record (``qbench.engine.evidence``)."""

CONFIG_FIELDS: dict[str, str] = {
    "model": "str", "weights_tag": "str", "quantizer": "str", "quantizer_params": "object", "bits": "str",
    "scope": "str", "proxy": "str|null", "proxy_n": "int", "seed": "int", "limit": "int|null", "suites": "array",
    "scorers": "object", "scorer_resources": "object", "device": "str", "qbench_version": "str",
    "random_init": "bool", "config_hash": "str",
}
"""The resolved configuration (``qbench.engine.evaluate.resolve``); ``proxy`` is null for a quantizer without calibration."""
OPTIONAL_CONFIG_FIELDS: dict[str, str] = {"logit_tuning": "bool", "checkpoint": "object"}
CHECKPOINT_FIELDS: dict[str, str] = {"config_hash": "str", "sha256": "str"}
SUITE_ENTRY_FIELDS: dict[str, str] = {"name": "str", "version": "int"}

PROVENANCE_FIELDS: dict[str, str] = {
    "qbench_version": "str", "torch_version": "str", "open_clip_version": "str", "python_version": "str",
    "platform": "str", "device": "str", "created_at": "str", "threads": "object", "batching": "object",
}

VERIFICATION_FIELDS: dict[str, str] = {
    "passed": "bool", "n_modules": "int", "towers": "array", "expect_quantized": "bool", "expected": "object|null",
    "modules": "array", "slots": "array", "float_extras": "object", "problems": "array",
}
"""``qbench.quant.verify.VerificationReport.to_dict``; ``expected`` is the run's plan
(``qbench.quant.layout.VerificationPlan.to_dict``)."""
MODULE_CHECK_FIELDS: dict[str, str] = {
    "name": "str", "tower": "str|null", "kind": "str", "weight_bits": "int|null", "weight_max_unique": "int|null",
    "weight_granularity": "str|null", "act_bits": "int", "act_max_unique": "int|null", "act_granularity": "str",
    "fired": "bool", "calls": "int", "expected_weight_bits": "int|null", "expected_act_bits": "int|null",
    "weight_grouping": "str|null", "act_grouping": "str", "weight_min_group": "int|null", "act_min_group": "int|null",
    "weight_grid_steps": "number|null", "act_grid_steps": "number|null",
}
"""``qbench.quant.verify.ModuleCheck`` (modules and attention slots alike)."""

MODEL_FIELDS: dict[str, str] = {
    "weights_source": "str", "weights_path": "str|null", "hf_repo": "str|null", "arch": "str", "quick_gelu": "bool",
    "head_modules": "array", "depth": "int", "batchnorm": "str",
}
"""How the weights were loaded (``VLM.load_info`` of the pretrained-model loaders), all optional: empty for the toy models."""

DATASET_FIELDS: dict[str, str] = {
    "num_images": "int", "num_scored": "int", "fingerprint": "str", "unreadable": "int", "unreadable_examples": "array",
}
OPTIONAL_DATASET_FIELDS: dict[str, str] = {"notes": "array"}

RESULT_FIELDS: dict[str, str] = {
    "suite": "str", "suite_version": "int", "task": "str", "dataset": "str", "metric": "str",
    "fp32": "number|null", "quantized": "number|null", "delta": "number|null", "diff": "number|null",
    "logit_tuned": "bool",
}
"""Keys of every result record (``qbench.engine.task_scoring``, ``qbench.engine.ood_eval``, spectral and dropout tasks)."""
OPTIONAL_RESULT_FIELDS: dict[str, str] = {
    "param": "str", "value": "number|null", "bootstrap": "object", "role": "str", "group": "str",
    "delta_common": "number|null", "delta_counter": "number|null", "scorer": "str", "id_dataset": "str",
    "ood_dataset": "str", "ood_kind": "str",
}
BOOTSTRAP_FIELDS: dict[str, str] = {
    "se_fp": "number", "se_q": "number", "diff": "number", "diff_se": "number", "ci_low": "number",
    "ci_high": "number", "p_value": "number", "resamples": "int",
}
"""``qbench.analysis.statistics.paired_accuracy_bootstrap`` on accuracy records."""

EVIDENCE_FIELDS: dict[str, str] = {"sha256": "str", "format": "str", "version": "int", "n_bytes": "int"}
"""The ``evidence`` record naming the per-sample evidence file beside the submission (``qbench.engine.evidence``)."""

RESULT_TASKS = ("zeroshot", "robustness", "spurious", "ood", "spectral", "dropout")
RESULT_ROLES = ("clean", "shifted", "mean")
RESULT_GROUPS = ("common", "counter")
OOD_KINDS = ("near", "far", "shift")

# -- limits ---------------------------------------------------------------------------------------------------------

MAX_RESULTS = 5000
"""Most result records (the largest built-in evaluation, every OOD suite x 7 scorers x 2 tunings, has < 1,000)."""
MAX_SECTION_ITEMS = 5000
"""Most entries of any other list section (reliability, trajectories, histograms, modules, problems, ...)."""
MAX_NAME_CHARS = 128
"""Longest plugin, dataset, module or parameter name."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=:, -]*$")
"""What a name rendered or matched against the registry may contain: no markup, no path separators."""
HEX16 = re.compile(r"^[0-9a-f]{16}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")

_LIST_SECTIONS = ("skipped", "reliability", "bin_trajectories", "ood_histograms", "spectral", "dropout")


class Checker:
    """Builds one-line errors prefixed with the submission's source (a file path or ``store:HASH``)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, problem: str) -> QbenchError:
        """The error for ``problem`` (one line: whitespace runs collapse to one space)."""
        return QbenchError(one_line(f"{self.source}: {problem}"))

    def require(self, parent: Mapping[str, Any], key: str, kind: str, path: str) -> Any:
        """``parent[key]``, checked against ``kind``; ``path`` is the dotted path for messages."""
        if key not in parent:
            raise self.fail(f"missing key {path}")
        value = parent[key]
        if not is_kind(value, kind):
            raise self.fail(f"{path} must be {describe(kind)}, got {json_type(value)} {short(value)}")
        return value

    def fields(self, obj: Any, required: Mapping[str, str], optional: Mapping[str, str], path: str) -> dict[str, Any]:
        """``obj`` checked to be an object with every ``required`` key, no key outside ``required``/``optional``,
        and every present value of its declared type."""
        if not isinstance(obj, dict):
            raise self.fail(f"{path} must be an object, got {json_type(obj)} {short(obj)}")
        for key in obj:
            if key not in required and key not in optional:
                allowed = ", ".join(sorted({**required, **optional}))
                raise self.fail(f"{join(path, key)} is not a field qbench writes (allowed in {path or 'the document'}: "
                                f"{allowed}); remove it")
        for key, kind in required.items():
            self.require(obj, key, kind, join(path, key))
        for key, kind in optional.items():
            if key in obj:
                self.require(obj, key, kind, join(path, key))
        return obj

    def items(self, value: list[Any], path: str, limit: int) -> list[Any]:
        """``value`` (an array) when it holds at most ``limit`` entries."""
        if len(value) > limit:
            raise self.fail(f"{path} has {len(value):,} entries, more than the {limit:,} a submission may hold; "
                            "submit the document qbench wrote")
        return value

    def name(self, value: Any, path: str) -> str:
        """``value`` when it is a short name of safe characters (plugin, dataset, module, parameter)."""
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS or not NAME.match(value):
            raise self.fail(f"{path} must be a name of at most {MAX_NAME_CHARS} letters, digits and . _ - + = : , "
                            f"characters, got {short(value)}")
        return value


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` (a parsed JSON value) has JSON type ``kind`` (alternatives joined by ``|``)."""
    checks = {
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "null": lambda v: v is None,
    }
    return any(checks[option](value) for option in kind.split("|"))


def describe(kind: str) -> str:
    names = {"str": "a string", "bool": "true or false", "int": "an integer", "number": "a number",
             "object": "an object", "array": "an array", "null": "null"}
    return " or ".join(names[option] for option in kind.split("|"))


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def short(value: Any, limit: int = 40) -> str:
    """A value quoted for a message, at most ``limit`` characters, ASCII only (no markup or control characters)."""
    text = json.dumps(value, default=str, allow_nan=True, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str) -> str:
    return " ".join(text.split())


def check_document_shape(check: Checker, document: Any) -> None:
    """Every level a submission is judged by has exactly the keys ``qbench eval --json`` writes, of the right
    types and in bounded numbers: top level, config, provenance, verification (and each module), datasets,
    result records (and their bootstrap), evidence."""
    if not isinstance(document, dict):
        raise check.fail(f"expected a JSON object as printed by 'qbench eval --json', got {json_type(document)}")
    check.fields(document, TOP_LEVEL_FIELDS, OPTIONAL_TOP_LEVEL_FIELDS, "")
    _check_config_shape(check, document["config"])
    check.fields(document["provenance"], PROVENANCE_FIELDS, {}, "provenance")
    check.fields(document["model"], {}, MODEL_FIELDS, "model")
    _check_verification_shape(check, document["verification"])
    for name, entry in document["datasets"].items():
        path = f"datasets.{name}"
        check.name(name, f"datasets key {short(name)}")
        check.fields(entry, DATASET_FIELDS, OPTIONAL_DATASET_FIELDS, path)
    results = check.items(document["results"], "results", MAX_RESULTS)
    for index, record in enumerate(results):
        path = f"results[{index}]"
        check.fields(record, RESULT_FIELDS, OPTIONAL_RESULT_FIELDS, path)
        if "bootstrap" in record:
            check.fields(record["bootstrap"], BOOTSTRAP_FIELDS, {}, f"{path}.bootstrap")
    for section in _LIST_SECTIONS:
        check.items(document[section], section, MAX_SECTION_ITEMS)
    if "evidence" in document:
        _check_evidence_shape(check, document["evidence"])


def _check_config_shape(check: Checker, config: Any) -> None:
    check.fields(config, CONFIG_FIELDS, OPTIONAL_CONFIG_FIELDS, "config")
    suites = check.items(config["suites"], "config.suites", MAX_SECTION_ITEMS)
    for index, entry in enumerate(suites):
        check.fields(entry, SUITE_ENTRY_FIELDS, {}, f"config.suites[{index}]")
    if "checkpoint" in config:
        checkpoint = check.fields(config["checkpoint"], CHECKPOINT_FIELDS, {}, "config.checkpoint")
        for key in CHECKPOINT_FIELDS:
            if not HEX16.match(checkpoint[key]):
                raise check.fail(f"config.checkpoint.{key} must be 16 lowercase hex digits, got {short(checkpoint[key])}")


def _check_verification_shape(check: Checker, verification: Any) -> None:
    check.fields(verification, VERIFICATION_FIELDS, {}, "verification")
    for section in ("modules", "slots"):
        for index, entry in enumerate(check.items(verification[section], f"verification.{section}", MAX_SECTION_ITEMS)):
            check.fields(entry, MODULE_CHECK_FIELDS, {}, f"verification.{section}[{index}]")
    for section in ("towers", "problems"):
        for index, entry in enumerate(check.items(verification[section], f"verification.{section}", MAX_SECTION_ITEMS)):
            if not isinstance(entry, str):
                raise check.fail(f"verification.{section}[{index}] must be a string, got {json_type(entry)} {short(entry)}")
    for key, reason in verification["float_extras"].items():
        check.name(key, f"verification.float_extras key {short(key)}")
        if not isinstance(reason, str):
            raise check.fail(f"verification.float_extras.{key} must be a string, got {json_type(reason)}")


def _check_evidence_shape(check: Checker, evidence: Any) -> None:
    check.fields(evidence, EVIDENCE_FIELDS, {}, "evidence")
    if not HEX64.match(evidence["sha256"]):
        raise check.fail(f"evidence.sha256 must be 64 lowercase hex digits, got {short(evidence['sha256'])}")
    if evidence["n_bytes"] < 0 or evidence["version"] < 1:
        raise check.fail("evidence.n_bytes must be >= 0 and evidence.version >= 1")
    check.name(evidence["format"], "evidence.format")
