"""Does a submission describe a run that this qbench, with its built-in plugins, would produce?

:mod:`qbench.reporting.submission_schema` checks a submission's shape; this module checks its substance against the code:

* **registered plugins**: the model, quantizer and every suite are registered by qbench's built-in plugins (the
  registry is built *without* entry points, so an installed package cannot add or shadow a name), each suite at
  the version recorded;
* **real weights**: the model's registered weights tag, never ``file:PATH`` (``--weights``) or ``:random-init``,
  and a model section that says so (no ``random-init``/``file``/``folder`` weights source, no reduced depth);
* **a full run**: no ``--limit`` (``config.limit`` null), every image of every dataset scored, none unreadable;
* **the configuration reproduces**: ``qbench.engine.evaluate.resolve`` given the same model, quantizer, parameters,
  bits, scope, suites, scorers and seed builds exactly the submitted configuration (same fields, same values,
  same hash), so an edited configuration with a recomputed hash is still caught when it names a run qbench would
  not make;
* **verification is consistent**: it passed with no problems, under the plan the current verifier makes for the
  run (``qbench.quant.layout``: the bit spec, the quantizer's layout, the model's first layers), over every
  quantizable module of the model in the run's scope (the inventory is read from the registered model's
  architecture) and nothing else, every module and attention slot at the plan's bits and groupings;
* **record names**: every result's suite version, dataset, scorer and OOD dataset belong to the configuration.

Every failure is one :class:`~qbench.errors.QbenchError` line from :class:`~qbench.reporting.submission_schema.Checker`.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from qbench.engine.confighash import canonical_json
from qbench.errors import QbenchError
from qbench.quant.spec import FLOAT_ACTIVATION_BITS, BitSpec, Scope
from qbench.reporting.submission_schema import (OOD_KINDS, RESULT_GROUPS, RESULT_ROLES, RESULT_TASKS, Checker, short)

if TYPE_CHECKING:
    from qbench.engine.evaluate import ResolvedRun
    from qbench.registry import Registry

UNTRUSTED_WEIGHT_SOURCES = ("random-init", "file", "folder")
"""``model.weights_source`` values (``plugins/models/weights.py``) of weights that are not the registered ones."""


@functools.cache
def submission_registry() -> "Registry":
    """Plugins a submission may name: qbench's built-ins only (no entry points), built once per process."""
    from qbench.plugins import get_plugin_manager
    from qbench.registry import build_registry

    return build_registry(get_plugin_manager(load_entrypoints=False))


@functools.lru_cache(maxsize=2)  # a pretrained model's architecture is large: keep the last two only
def _architecture(model_name: str, towers: tuple[str, ...]) -> tuple[Any, tuple[tuple[str, Any], ...], frozenset[str]]:
    """The registered model built with random weights (only its module structure matters, and no weights file is
    needed), attention rewritten in ``towers`` as every quantizer does before wrapping: the model, its in-scope
    Linear/Conv2d modules (heads excluded) and its rewritten attention modules in scope."""
    from qbench.model import LoadRequest
    from qbench.quant.modules import QuantizableMultiheadAttention, in_scope_modules, rewrite_tower_attention

    spec = submission_registry().get("models", model_name)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # open_clip warns that a random-init model has no pretrained weights
    try:
        vlm = spec.loader(LoadRequest(random_init=True))
    finally:
        logger.setLevel(level)
    rewrite_tower_attention(vlm, towers)
    modules = tuple(in_scope_modules(vlm, towers))
    attention = frozenset(name for name, module in vlm.model.named_modules()
                          if isinstance(module, QuantizableMultiheadAttention) and vlm.tower_of(name) in towers)
    return vlm, modules, attention


@dataclass(frozen=True)
class ModuleRule:
    """What the verifier must report for one tensor role: bits (16 = float input) and the core grouping."""

    bits: int
    grouping: str


@dataclass(frozen=True)
class ExpectedVerification:
    """What the current verifier expects of a run, computed from the registered model's architecture, the run's
    bit spec and its quantizer's layout (``qbench.quant.layout``), never from the submission.

    ``modules`` maps each in-scope quantizable module to ``(tower, kind, weight rule, input rule)``; ``slots``
    maps each attention slot the plan declares to its rule; ``plan`` is ``VerificationPlan.to_dict()``.
    """

    modules: dict[str, tuple[str | None, str, ModuleRule, ModuleRule]]
    attention: frozenset[str]
    slots: dict[str, ModuleRule]
    plan: dict[str, Any]


def expected_verification(resolved: "ResolvedRun") -> ExpectedVerification:
    """The verifier's plan for ``resolved`` on the registered model (see :class:`ExpectedVerification`)."""
    from qbench.quant.layout import verification_plan

    towers = resolved.scope.towers
    vlm, modules, attention = _architecture(resolved.model.name, tuple(towers))
    plan = verification_plan(resolved.bits, resolved.quantizer.verification_layout(resolved.bits), vlm, modules)
    rules = {}
    for name, module in modules:
        weight, inputs = plan.weight_rule(name), plan.input_rule(name, module)
        rules[name] = (vlm.tower_of(name), type(module).__name__, ModuleRule(weight.bits, str(weight.grouping)),
                       ModuleRule(inputs.bits, str(inputs.grouping)) if inputs is not None
                       else ModuleRule(FLOAT_ACTIVATION_BITS, "float"))
    slots = {}
    for owner in attention:
        for slot in plan.slots:
            rule = plan.slot_rule(slot, True)
            if rule is not None:
                slots[f"{owner}.{slot}"] = ModuleRule(rule.bits, str(rule.grouping))
    return ExpectedVerification(rules, attention, slots, plan.to_dict())


def check_against_code(check: Checker, document: Mapping[str, Any], registry: "Registry | None" = None) -> None:
    """Every check of this module, in the order a reader would ask: registered, real weights, full run,
    reproducible configuration, consistent verification, datasets, record names."""
    registry = registry if registry is not None else submission_registry()
    config = document["config"]
    check_registered(check, config, registry)
    check_real_weights(check, config, document["model"], registry)
    check_full_run(check, document)
    resolved = check_reproduces(check, config, registry)
    check_verification(check, document["verification"], config, resolved)
    check_datasets(check, document["datasets"], resolved)
    check_record_names(check, document["results"], config, resolved)


def _reason(error: Exception) -> str:
    """A :class:`QbenchError`'s message, or another exception's type and first line."""
    if isinstance(error, QbenchError):
        return str(error)
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def check_registered(check: Checker, config: Mapping[str, Any], registry: "Registry") -> None:
    """Model, quantizer and suites registered by the built-in plugins, suites at their registered versions,
    and bits and scope in the parser's canonical form."""
    for kind, key in (("models", "model"), ("quantizers", "quantizer")):
        try:
            registry.entry(kind, config[key])
        except QbenchError as error:
            raise check.fail(f"config.{key}: {error}") from None
    for index, entry in enumerate(config["suites"]):
        path = f"config.suites[{index}]"
        try:
            suite = registry.get("suites", entry["name"])
        except QbenchError as error:
            raise check.fail(f"{path}.name: {error}") from None
        if entry["version"] != suite.version:
            raise check.fail(f"{path}.version is {short(entry['version'])} but suite {suite.name!r} is registered at "
                             f"version {suite.version}; re-run the evaluation with this qbench")
    try:
        bits = BitSpec.parse(config["bits"])
        scope = Scope.parse(config["scope"])
    except QbenchError as error:
        raise check.fail(f"config: {error}") from None
    if str(bits) != config["bits"] or scope.value != config["scope"]:
        raise check.fail(f"config.bits/config.scope must be written as qbench writes them ({bits}, {scope.value}), "
                         f"got {short(config['bits'])}/{short(config['scope'])}")


def check_real_weights(check: Checker, config: Mapping[str, Any], model_section: Mapping[str, Any],
                       registry: "Registry") -> None:
    """The registered weights: no ``--random-init``, no ``--weights`` file, the registered tag exactly."""
    tag = config["weights_tag"]
    if config["random_init"]:
        raise check.fail("config.random_init is true: results from randomly initialised weights are not accepted; "
                         "evaluate the registered weights")
    if tag.endswith(":random-init"):
        raise check.fail(f"config.weights_tag {short(tag)} marks randomly initialised weights; evaluate the "
                         "registered weights")
    if tag.startswith("file:"):
        raise check.fail(f"config.weights_tag {short(tag)} names a local weights file (--weights); only the "
                         "registered weights are accepted, evaluate without --weights")
    registered = registry.get("models", config["model"]).weights_tag
    if tag != registered:
        raise check.fail(f"config.weights_tag {short(tag)} is not the registered weights of {config['model']!r} "
                         f"({registered}); evaluate the registered weights")
    source = model_section.get("weights_source")
    if source in UNTRUSTED_WEIGHT_SOURCES:
        raise check.fail(f"model.weights_source is {short(source)}: only the registered weights (from the cache or "
                         "a download) are accepted")
    if "depth" in model_section:
        raise check.fail("model.depth is set: a reduced-depth build is not the registered model")


def check_full_run(check: Checker, document: Mapping[str, Any]) -> None:
    """No ``--limit``, and every image of every dataset scored (none skipped as unreadable)."""
    limit = document["config"]["limit"]
    if limit is not None:
        raise check.fail(f"config.limit is {short(limit)}: a --limit run scores only the first images of each "
                         "dataset; submit a full run (no --limit)")
    for name, info in document["datasets"].items():
        path = f"datasets.{name}"
        if info["num_images"] < 1:
            raise check.fail(f"{path}.num_images is {info['num_images']}: a dataset of a full run has images")
        if info["unreadable"] != 0 or info["unreadable_examples"]:
            raise check.fail(f"{path}.unreadable is {short(info['unreadable'])}: the run skipped unreadable images; "
                             "repair the dataset files and re-run")
        if info["num_scored"] != info["num_images"]:
            raise check.fail(f"{path}.num_scored {info['num_scored']} is not num_images {info['num_images']}: only "
                             "full runs are accepted")


def request_for(config: Mapping[str, Any]):
    """The :class:`~qbench.engine.evaluate.EvalRequest` that resolves to ``config`` if ``config`` is what qbench wrote."""
    from qbench.builtins import eval_defaults
    from qbench.engine.evaluate import EvalRequest

    scorers = config["scorers"]
    return EvalRequest(
        model=config["model"], quantizer=config["quantizer"],
        quantizer_params=tuple(config["quantizer_params"].items()), bits=config["bits"], scope=config["scope"],
        suites=tuple(entry["name"] for entry in config["suites"]), seed=config["seed"], device=config["device"],
        proxy=config["proxy"] if config["proxy"] is not None else eval_defaults().proxy,
        proxy_n=config["proxy_n"] if config["proxy"] is not None else EvalRequest.proxy_n,
        limit=config["limit"], random_init=config["random_init"],
        scorers=tuple(scorers),
        scorer_params=tuple((name, key, value) for name, params in scorers.items() if isinstance(params, dict)
                            for key, value in params.items()),
        logit_tuning=config.get("logit_tuning") is True,
    )


def check_reproduces(check: Checker, config: Mapping[str, Any], registry: "Registry") -> "ResolvedRun":
    """``qbench.engine.evaluate.resolve`` of the same request gives exactly ``config`` (values, types and hash).

    ``checkpoint`` (a run restored from ``qbench quantize --out``) names a file the reviewer does not have; its
    shape is checked by the schema and it is carried over as submitted.
    """
    from qbench.engine.confighash import config_hash
    from qbench.engine.evaluate import resolve

    for name, params in config["scorers"].items():
        if not isinstance(params, dict):
            raise check.fail(f"config.scorers.{name} must be an object of parameters, got {short(params)}")
    try:
        resolved = resolve(request_for(config), registry, check_device=False)
    except Exception as error:  # a plugin refusing a hostile parameter must still be one line
        raise check.fail(f"config does not resolve with this qbench: {_reason(error)}") from None
    expected = copy.deepcopy(resolved.config)
    if "checkpoint" in config:
        expected["checkpoint"] = dict(config["checkpoint"])
    expected["config_hash"] = config_hash(expected)
    for key in sorted(set(expected) | set(config), key=lambda name: (name == "config_hash", name)):  # the hash last
        if key not in config:
            raise check.fail(f"missing key config.{key} (this qbench writes {short(expected[key])}); re-run the "
                             "evaluation with this qbench")
        if key not in expected or canonical_json(config[key]) != canonical_json(expected[key]):
            wanted = short(expected[key]) if key in expected else "no such field"
            raise check.fail(f"config.{key} is {short(config[key])} but this qbench resolves {wanted} for the same "
                             "model, quantizer, parameters, bits, scope and suites; re-run the evaluation with this qbench")
    return resolved


def check_verification(check: Checker, verification: Mapping[str, Any], config: Mapping[str, Any],
                       resolved: "ResolvedRun") -> None:
    """The verifier's report must have passed with no problems, under the plan the current verifier makes for this
    run, over exactly the model's quantizable modules in scope, each at the plan's bits and groupings."""
    if not verification["passed"]:
        raise check.fail("verification.passed is false: the quantized model failed the 2^b distinct-value check")
    if verification["problems"]:
        raise check.fail(f"verification.passed is true beside {len(verification['problems'])} problems (first: "
                         f"{short(verification['problems'][0], 80)}); a passing verification has none")
    towers = resolved.scope.towers
    if verification["towers"] != list(towers):
        raise check.fail(f"verification.towers is {short(verification['towers'])}, not the towers of scope "
                         f"{resolved.scope.value} ({', '.join(towers)})")
    expect = resolved.quantizer.family != "baseline"
    if verification["expect_quantized"] is not expect:
        raise check.fail(f"verification.expect_quantized must be {str(expect).lower()} for quantizer "
                         f"{resolved.quantizer.name!r} ({resolved.quantizer.family})")
    modules = verification["modules"]
    if verification["n_modules"] != len(modules):
        raise check.fail(f"verification.n_modules is {verification['n_modules']} but verification.modules lists "
                         f"{len(modules)}")
    if expect and not modules:
        raise check.fail(f"verification.n_modules is 0: quantizer {resolved.quantizer.name!r} must quantize the "
                         "model's modules in scope, and nothing was verified")
    try:
        expected = expected_verification(resolved)
    except Exception as error:  # the model cannot be built here, or a plugin's layout fails: one line
        raise check.fail(f"cannot list the quantizable modules of {config['model']!r} to check the verification: "
                         f"{_reason(error)}") from None
    planned = verification["expected"] is not None  # null: a verifier run without the run's plan (declared mode)
    if planned and canonical_json(verification["expected"]) != canonical_json(expected.plan):
        raise check.fail(f"verification.expected is {short(verification['expected'], 60)}, not the plan this qbench "
                         f"makes for {resolved.quantizer.name} at {resolved.bits} ({short(expected.plan, 60)}); "
                         "re-run the evaluation with this qbench")
    extras = _check_float_extras(check, verification["float_extras"], expected)
    seen = _check_modules(check, modules, expected, resolved, planned)
    if expect:
        missing = [name for name in expected.modules if name not in seen and not _under(name, extras)]
        if missing:
            raise check.fail(f"verification.modules lacks {len(missing)} of the {len(expected.modules)} quantizable "
                             f"modules of {config['model']!r} in scope {resolved.scope.value} (first: {missing[0]}); "
                             "every in-scope module must be quantized and verified")
    _check_slots(check, verification["slots"], expected, resolved)


def _under(name: str, prefixes: frozenset[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _check_float_extras(check: Checker, extras: Mapping[str, str], expected: ExpectedVerification) -> frozenset[str]:
    """Modules a method adds in float by design: they must be new modules, never in-scope ones (or their parents)."""
    for name in extras:
        covered = [module for module in expected.modules if _under(module, frozenset({name}))]
        if covered:
            raise check.fail(f"verification.float_extras.{name} would exempt the in-scope module {covered[0]} from "
                             "verification; float extras are modules a method adds, not the model's own")
    return frozenset(extras)


def _check_modules(check: Checker, modules: list[Mapping[str, Any]], expected: ExpectedVerification,
                   resolved: "ResolvedRun", planned: bool) -> set[str]:
    """Each verified module: in scope, listed once, in its tower, of its kind, run, at the plan's bits (declared,
    and expected when the report was ``planned``) and groupings (when ``planned``: declared mode names groupings
    after the quantizer's own granularity) and within 2 .. 2^b distinct values. Returns the names seen."""
    seen: set[str] = set()
    for index, entry in enumerate(modules):
        path = f"verification.modules[{index}]"
        name = check.name(entry["name"], f"{path}.name")
        if name not in expected.modules:
            raise check.fail(f"{path}.name {short(name)} is not a quantizable module of {resolved.model.name!r} in scope "
                             f"{resolved.scope.value}")
        if name in seen:
            raise check.fail(f"{path}.name {short(name)} is listed twice")
        seen.add(name)
        tower, kind, weight, inputs = expected.modules[name]
        if entry["tower"] != tower or entry["kind"] != kind:
            raise check.fail(f"{path} says {short(entry['kind'])} in tower {short(entry['tower'])}, but {name} is a "
                             f"{kind} in tower {tower}")
        if not entry["fired"] or entry["calls"] < 1:
            raise check.fail(f"{path} ({name}) never ran on the verification batch")
        reported = (entry["weight_bits"], entry["act_bits"], entry["expected_weight_bits"], entry["expected_act_bits"])
        wanted = (weight.bits, inputs.bits) * 2 if planned else (weight.bits, inputs.bits, None, None)
        if reported != wanted:
            raise check.fail(f"{path} ({name}) carries w{entry['weight_bits']}a{entry['act_bits']} (expected "
                             f"w{entry['expected_weight_bits']}a{entry['expected_act_bits']}) but the run's config.bits "
                             f"{resolved.bits} requires w{weight.bits}a{inputs.bits}")
        if planned and (entry["weight_grouping"], entry["act_grouping"]) != (weight.grouping, inputs.grouping):
            raise check.fail(f"{path} ({name}) is grouped {entry['weight_grouping']}/{entry['act_grouping']} but the "
                             f"plan for {resolved.quantizer.name} groups it {weight.grouping}/{inputs.grouping}")
        _check_unique(check, f"{path}.weight_max_unique", entry["weight_max_unique"], weight.bits)
        if inputs.bits >= FLOAT_ACTIVATION_BITS:
            if entry["act_max_unique"] is not None:
                raise check.fail(f"{path} ({name}) reports quantized inputs but the run keeps inputs float")
        else:
            _check_unique(check, f"{path}.act_max_unique", entry["act_max_unique"], inputs.bits)
    return seen


def _check_unique(check: Checker, path: str, unique: Any, bits: int) -> None:
    """A verified tensor holds 2 .. 2^bits distinct values in its fullest group (the verifier's own criterion)."""
    if not isinstance(unique, int) or isinstance(unique, bool) or not 2 <= unique <= 2**bits:
        raise check.fail(f"{path} is {short(unique)}: a {bits}-bit tensor holds 2 to {2**bits} distinct values per group")


def _check_slots(check: Checker, slots: list[Mapping[str, Any]], expected: ExpectedVerification,
                 resolved: "ResolvedRun") -> None:
    """Attention-slot entries: exactly the slots the plan declares on the in-scope attention (a slot quantizer the
    plan does not declare is held to A bits), each run, at the plan's bits, within 2 .. 2^b values."""
    from qbench.quant.modules import ATTENTION_SLOTS

    seen: set[str] = set()
    for index, entry in enumerate(slots):
        path = f"verification.slots[{index}]"
        name = check.name(entry["name"], f"{path}.name")
        owner, _, slot = name.rpartition(".")
        if owner not in expected.attention or slot not in ATTENTION_SLOTS or entry["kind"] != "attention-slot":
            raise check.fail(f"{path}.name {short(name)} is not an attention slot ({', '.join(ATTENTION_SLOTS)}) of "
                             f"{resolved.model.name!r} in scope {resolved.scope.value}")
        if name in seen:
            raise check.fail(f"{path}.name {short(name)} is listed twice")
        seen.add(name)
        rule = expected.slots.get(name, ModuleRule(resolved.bits.act_bits, "per_tensor"))
        if entry["weight_bits"] is not None or not entry["fired"] or entry["calls"] < 1:
            raise check.fail(f"{path} ({name}) must have no weight bits and must have run on the verification batch")
        if entry["act_bits"] != rule.bits or entry["expected_act_bits"] not in (None, rule.bits):
            raise check.fail(f"{path} ({name}) carries {entry['act_bits']} bits (expected {entry['expected_act_bits']}) "
                             f"but config.bits {resolved.bits} requires {rule.bits}")
        _check_unique(check, f"{path}.act_max_unique", entry["act_max_unique"], rule.bits)
    missing = sorted(set(expected.slots) - seen)
    if missing:
        raise check.fail(f"verification.slots lacks {len(missing)} of the {len(expected.slots)} attention slots the "
                         f"plan for {resolved.quantizer.name} declares (first: {missing[0]})")


def check_datasets(check: Checker, datasets: Mapping[str, Any], resolved: "ResolvedRun") -> None:
    """Exactly the datasets of the configuration's suites, each with a 16-hex-digit fingerprint."""
    from qbench.reporting.submission_schema import HEX16

    expected = set(resolved.datasets)
    if set(datasets) != expected:
        extra = sorted(set(datasets) - expected)
        lacking = sorted(expected - set(datasets))
        detail = f"has {extra[0]!r}, which no configured suite uses" if extra else f"lacks {lacking[0]!r}"
        raise check.fail(f"datasets {detail}; it must list the datasets of config.suites")
    for name, info in datasets.items():
        if not HEX16.match(info["fingerprint"]):
            raise check.fail(f"datasets.{name}.fingerprint must be 16 lowercase hex digits, got {short(info['fingerprint'])}")


def check_record_names(check: Checker, results: list[Mapping[str, Any]], config: Mapping[str, Any],
                       resolved: "ResolvedRun") -> None:
    """Each record's suite version, task, dataset, scorer, OOD side, role, group and tuning flag belong to the run."""
    from qbench.engine.task_scoring import SHIFTED_MEAN

    versions = {suite.name: suite.version for suite in resolved.suites}
    datasets = set(resolved.datasets)
    pairs = {f"{a}+{b}" for a in datasets for b in datasets}
    for index, record in enumerate(results):
        path = f"results[{index}]"
        suite = record["suite"]
        if suite not in versions:
            raise check.fail(f"{path}.suite {short(suite)} is not listed in config.suites")
        if record["suite_version"] != versions[suite]:
            raise check.fail(f"{path}.suite_version {record['suite_version']} is not config.suites' {versions[suite]}")
        _choice(check, record["task"], RESULT_TASKS, f"{path}.task")
        dataset = record["dataset"]
        if dataset not in datasets and dataset != SHIFTED_MEAN and dataset not in pairs:
            raise check.fail(f"{path}.dataset {short(dataset)} is not a dataset of config.suites")
        for key in ("id_dataset", "ood_dataset"):
            if key in record and record[key] not in datasets:
                raise check.fail(f"{path}.{key} {short(record[key])} is not a dataset of config.suites")
        if "scorer" in record and record["scorer"] not in config["scorers"]:
            raise check.fail(f"{path}.scorer {short(record['scorer'])} is not one of config.scorers")
        for key, choices in (("role", RESULT_ROLES), ("group", RESULT_GROUPS), ("ood_kind", OOD_KINDS)):
            if key in record:
                _choice(check, record[key], choices, f"{path}.{key}")
        if "param" in record:
            check.name(record["param"], f"{path}.param")
        if record["logit_tuned"] and config.get("logit_tuning") is not True:
            raise check.fail(f"{path}.logit_tuned is true but config.logit_tuning is not set")


def _choice(check: Checker, value: Any, choices: tuple[str, ...], path: str) -> None:
    if value not in choices:
        raise check.fail(f"{path} must be one of {', '.join(choices)}, got {short(value)}")
