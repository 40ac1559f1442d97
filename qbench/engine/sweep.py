"""Sweep files: a study grid in one versioned YAML file, expanded into configurations and work units.

A sweep file names the axes of the grid; every combination is one configuration (one ``qbench eval`` run,
one stored document)::

    version: 1
    name: my-study                   # optional; names the sweep folder
    models: [MODEL]
    quantizers: [QUANTIZER_A, QUANTIZER_B, family:qat]
    bits: [w8a8, w4a8]
    scopes: [visual, joint]
    seeds: [0, 1, 2]
    suites: [SUITE_A, [SUITE_B, SUITE_C]]   # an entry is one configuration's suites (a list: several together)
    qparams:                         # per quantizer: one mapping, or a list of mappings (an axis of its own)
      QUANTIZER_B: [{alpha: 0.5}, {alpha: 0.8}]
      QUANTIZER_C: {batch_size: 50}
    settings:                        # any other 'qbench eval' option, by its long name
      proxy_n: 500
      schedule: light
      device: cuda
    exclude:                         # drop every configuration matching all keys of a rule
      - {quantizer: family:qat, bits: w4a8, scope: joint}
    include:                         # add configurations (keys left out take the axis values above)
      - {quantizer: QUANTIZER_C, bits: w4a8, scope: joint, seeds: 0}
    slurm: {partition: gpu, gpus: 1, cpus: 8, time: "4:00:00"}   # defaults for --executor slurm

(``benchmarks/sweeps/study.yaml`` is a real one). Axes left out take ``qbench eval``'s defaults: the model,
quantizer and suites the built-in plugins declare (:func:`qbench.builtins.eval_defaults`), w8a8, visual, seed 0.
Rule keys are the singular axis names (``model``, ``quantizer``, ``bits``, ``scope``, ``seed``, ``suites``); a
value may be a list of alternatives, and a quantizer may be ``family:NAME``: every *built-in* quantizer of that
family, so a sweep file plans the same configurations whatever plugins are installed (name a third-party
quantizer explicitly to sweep it).

Compute once across the sweep. Configurations are grouped by everything that determines the FP32 model and
the data (model, weights, data root, limit, scorers, ...). Each group gets a *warm* unit that runs first: the
``fp32`` baseline on the union of the group's suites, which encodes every FP32 image and prompt of the group
once into the feature cache (itself a stored result). Every configuration unit then reads those features; the
cache locks of :mod:`qbench.engine.locks` keep it so even when units of one group run at the same time.

Every problem in a sweep file is one line naming the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from qbench.errors import QbenchError

if TYPE_CHECKING:
    from qbench.engine.evaluate import EvalRequest, ResolvedRun
    from qbench.registry import Registry

SWEEP_VERSION = 1
AXES = ("models", "quantizers", "bits", "scopes", "seeds", "suites")
TOP_KEYS = ("version", "name", *AXES, "qparams", "settings", "exclude", "include", "warm", "slurm")
RULE_KEYS = {"model": "models", "quantizer": "quantizers", "bits": "bits", "scope": "scopes", "seed": "seeds",
             "suites": "suites"}
"""Rule key -> the axis it selects on (``include`` also accepts the plural axis names)."""
def axis_defaults() -> dict[str, list[Any]]:
    """The value of each axis a sweep file leaves out: ``qbench eval``'s defaults (model, quantizer and suites
    from the built-in plugins' :class:`~qbench.builtins.EvalDefaults`)."""
    from qbench.builtins import eval_defaults

    defaults = eval_defaults()
    return {"models": [defaults.model], "quantizers": [defaults.quantizer], "bits": ["w8a8"], "scopes": ["visual"],
            "seeds": [0], "suites": [list(defaults.suites)]}
FORBIDDEN_SETTINGS = {
    "model": "use the models axis", "quantizers": "use the quantizers axis", "bits_list": "use the bits axis",
    "scope": "use the scopes axis", "seed": "use the seeds axis", "seeds": "use the seeds axis",
    "suites": "use the suites axis", "qparam": "use the qparams section", "checkpoint_dir": "sweeps quantize",
    "as_json": "use 'qbench sweep status --json'", "force": "delete the stored results to recompute them",
    "markdown_path": "use 'qbench report' on the results", "plots_dir": "use 'qbench report' on the results",
    "store_path": "pass --store to 'qbench sweep'",
}
SETTING_ALIASES = {"bits": "bits_list", "quantizer": "quantizers", "suite": "suites", "seeds": "seeds",
                   "qparams": "qparam", "sparams": "sparam", "scorer": "scorers", "checkpoint": "checkpoint_dir",
                   "json": "as_json", "markdown": "markdown_path", "plots": "plots_dir", "store": "store_path"}
"""Setting names as written in a file -> the ``qbench eval`` parameter they set."""
SLURM_KEYS = ("partition", "gpus", "cpus", "time", "account", "qos", "mem", "constraint", "setup", "max_parallel",
              "units_per_job", "additional")
WARM_QUANTIZER = "fp32"
"""The quantizer of warm units: the float model as both states, encoded once."""


# -- reading the file, with line numbers -------------------------------------------------------------
@dataclass(frozen=True)
class SweepSource:
    """Where a sweep's settings came from, for one-line errors: a file (with the line of every key) or flags."""

    label: str
    lines: dict[tuple, int] = field(default_factory=dict)

    def where(self, *path: Any) -> str:
        """``FILE line N`` of the deepest known key along ``path`` (``FILE`` when no line is known)."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return f"{self.label} line {line}"
        return self.label

    def error(self, path: Sequence[Any], message: str) -> QbenchError:
        key = ".".join(str(part) for part in path)
        return QbenchError(f"{self.where(*path)}{f' ({key})' if key else ''}: {message}")


def read_sweep_file(path: str | Path) -> tuple[dict[str, Any], SweepSource]:
    """The sweep file's mapping and the line of every key and list item; YAML problems are one line."""
    import yaml

    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise QbenchError(f"cannot read sweep file {file} ({getattr(error, 'strerror', None) or error}); "
                          "pass an existing YAML file") from None
    source = SweepSource(str(file))
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise QbenchError(f"{file}{where}: not valid YAML ({problem}); fix the file's syntax") from None
    if not isinstance(data, dict):
        raise QbenchError(f"{file}: a sweep file is a mapping of axes (models, quantizers, bits, ...), got "
                          f"{type(data).__name__}")
    _record_lines(node, (), source.lines, source)
    return data, source


def _record_lines(node: Any, path: tuple, lines: dict[tuple, int], source: SweepSource) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise QbenchError(f"{source.label} line {key_node.start_mark.line + 1}: duplicate key {key!r}; "
                                  "give each key once")
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _record_lines(value_node, path + (key,), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _record_lines(item, path + (index,), lines, source)


# -- the spec ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """An ``exclude``/``include`` entry: axis -> accepted values (an absent axis accepts anything)."""

    values: dict[str, tuple[Any, ...]]
    qparams: dict[str, str]
    position: tuple[str, int]


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: axis values, per-quantizer parameter variants, ``qbench eval`` settings and rules."""

    name: str
    axes: dict[str, tuple[Any, ...]]
    qparams: dict[str, tuple[dict[str, str], ...]]
    settings: dict[str, Any]
    exclude: tuple[Rule, ...]
    include: tuple[Rule, ...]
    warm: bool
    slurm: dict[str, Any]
    source: SweepSource

    @property
    def digest(self) -> str:
        """A short hash of what the sweep asks for (names the sweep folder)."""
        payload = {"axes": self.axes, "qparams": self.qparams, "settings": self.settings,
                   "exclude": [rule.values for rule in self.exclude], "include": [rule.values for rule in self.include],
                   "warm": self.warm}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]


def parse_spec(data: dict[str, Any], source: SweepSource) -> SweepSpec:
    """Check a sweep mapping's keys and shapes (names are checked against the registry at expansion)."""
    for key in data:
        if key not in TOP_KEYS:
            raise source.error([key], f"unknown key {key!r}{_close(key, TOP_KEYS)}; a sweep file has "
                                      f"{', '.join(TOP_KEYS)}")
    version = data.get("version")
    if version != SWEEP_VERSION:
        raise source.error(["version"] if "version" in data else [],
                           f"'version: {SWEEP_VERSION}' is required (got {version!r}); this qbench reads sweep files "
                           f"of version {SWEEP_VERSION}")
    axes = {axis: _axis(data, axis, source) for axis in AXES}
    name = data.get("name", "sweep")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise source.error(["name"], f"bad name {name!r}: use letters, digits, '-' and '_'")
    warm = data.get("warm", True)
    if not isinstance(warm, bool):
        raise source.error(["warm"], f"warm must be true or false, got {warm!r}")
    return SweepSpec(
        name=name, axes=axes, qparams=_qparams(data.get("qparams"), source), settings=_settings(data, source),
        exclude=tuple(_rules(data, "exclude", source)), include=tuple(_rules(data, "include", source)), warm=warm,
        slurm=_slurm(data.get("slurm"), source), source=source,
    )


def _axis(data: dict[str, Any], axis: str, source: SweepSource) -> tuple[Any, ...]:
    if axis not in data:
        return tuple(axis_defaults()[axis])
    raw = data[axis]
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise source.error([axis], f"{axis} is empty; give at least one value or leave the key out")
    return tuple(_axis_value(axis, value, source, [axis, index] if isinstance(raw, list) else [axis])
                 for index, value in enumerate(values))


def _axis_value(axis: str, value: Any, source: SweepSource, path: list[Any]) -> Any:
    if axis == "seeds":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise source.error(path, f"bad seed {value!r}: seeds are non-negative integers")
        return value
    if axis == "suites":
        group = value if isinstance(value, list) else [value]
        if not group or not all(isinstance(item, str) and item for item in group):
            raise source.error(path, f"bad suites entry {value!r}: a suite name or a list of suite names")
        return tuple(dict.fromkeys(group))
    if not isinstance(value, str) or not value.strip():
        raise source.error(path, f"bad {axis} entry {value!r}: expected a name")
    return value.strip()


def _qparams(raw: Any, source: SweepSource) -> dict[str, tuple[dict[str, str], ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise source.error(["qparams"], "qparams maps a quantizer name to {param: value} or a list of such mappings")
    variants = {}
    for quantizer, value in raw.items():
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(item, dict) for item in items):
            raise source.error(["qparams", quantizer], f"qparams.{quantizer} must be a mapping or a list of mappings, "
                                                       "e.g. {alpha: 0.5}")
        variants[str(quantizer)] = tuple({str(key): str(val) for key, val in item.items()} for item in items)
    return variants


def _settings(data: dict[str, Any], source: SweepSource) -> dict[str, Any]:
    raw = data.get("settings") or {}
    if not isinstance(raw, dict):
        raise source.error(["settings"], "settings is a mapping of 'qbench eval' options, e.g. {proxy_n: 500}")
    return dict(raw)


def _rules(data: dict[str, Any], key: str, source: SweepSource) -> list[Rule]:
    raw = data.get(key) or []
    if not isinstance(raw, list):
        raise source.error([key], f"{key} is a list of rules, e.g. [{{quantizer: NAME, bits: w4a8}}]")
    rules = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or not entry:
            raise source.error([key, index], f"each {key} rule is a non-empty mapping of axis values")
        values, qparams = {}, {}
        for name, value in entry.items():
            axis = RULE_KEYS.get(name) or (name if name in AXES and key == "include" else None)
            if name == "qparams" and key == "include":
                if not isinstance(value, dict):
                    raise source.error([key, index, name], "qparams of an include rule is a mapping {param: value}")
                qparams = {str(k): str(v) for k, v in value.items()}
                continue
            if axis is None:
                allowed = ", ".join(RULE_KEYS) + (", qparams" if key == "include" else "")
                raise source.error([key, index, name], f"unknown key {name!r} in a {key} rule{_close(name, RULE_KEYS)}; "
                                                       f"use {allowed}")
            items = value if isinstance(value, list) and axis != "suites" else [value]
            if axis == "suites" and isinstance(value, list) and value and all(isinstance(item, list) for item in value):
                items = value
            values[axis] = tuple(_axis_value(axis, item, source, [key, index, name]) for item in items)
        rules.append(Rule(values, qparams, (key, index)))
    return rules


def _slurm(raw: Any, source: SweepSource) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise source.error(["slurm"], f"slurm is a mapping of executor settings ({', '.join(SLURM_KEYS)})")
    for key, value in raw.items():
        if key not in SLURM_KEYS:
            raise source.error(["slurm", key], f"unknown slurm setting {key!r}{_close(key, SLURM_KEYS)}; use "
                                               f"{', '.join(SLURM_KEYS)}")
        if key in ("gpus", "cpus", "max_parallel", "units_per_job") and (
                isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "gpus" else 1)):
            raise source.error(["slurm", key], f"slurm.{key} must be a whole number{' >= 0' if key == 'gpus' else ' >= 1'}, "
                                               f"got {value!r}")
        if key == "time":
            from qbench.engine.sweep_jobs import parse_time_minutes

            try:
                parse_time_minutes(value)
            except QbenchError as error:
                raise source.error(["slurm", key], str(error).replace("--time", "slurm.time")) from None
        if key == "setup" and not (isinstance(value, list) and all(isinstance(line, str) for line in value)):
            raise source.error(["slurm", key], "slurm.setup is a list of shell lines, e.g. ['module load cuda']")
        if key == "additional" and not isinstance(value, dict):
            raise source.error(["slurm", key], "slurm.additional is a mapping of extra #SBATCH options, e.g. {mail-type: END}")
    return dict(raw)


def _close(name: Any, choices: Iterable[str]) -> str:
    import difflib

    match = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# -- expansion into configurations ---------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One configuration of the sweep, resolved: what a job runs and how it is identified."""

    request: "EvalRequest"
    config_hash: str
    quantization_hash: str
    stage: str  # "warm" (an FP32 baseline that encodes its group's features once; runs first) or "config"
    group: str
    label: str
    requested: bool = True
    """Whether the sweep asks for this configuration (a warm unit the grid does not contain is added for speed)."""
    siblings: tuple[str, ...] = ()
    """Config hashes of the sweep that share this unit's quantized model (it is dropped once all are stored)."""


@dataclass(frozen=True)
class ExpandedSweep:
    """A sweep's units in run order: warm units first, then configurations grouped by model and quantization."""

    spec: SweepSpec
    units: tuple[Unit, ...]

    @property
    def configs(self) -> tuple[Unit, ...]:
        """The configurations the sweep asks for (warm units the grid does not contain are left out)."""
        return tuple(unit for unit in self.units if unit.requested)

    def by_hash(self) -> dict[str, Unit]:
        return {unit.config_hash: unit for unit in self.units}


def expand(spec: SweepSpec, registry: "Registry", eval_options: Callable[[dict[str, Any]], dict[str, Any]],
           base_request: Callable[[dict[str, Any]], "EvalRequest"]) -> ExpandedSweep:
    """Every configuration of ``spec`` (axes x qparam variants, minus ``exclude``, plus ``include``), resolved.

    ``eval_options(settings)`` turns the ``settings`` section into ``qbench eval`` option values (click's own
    parsing and checks); ``base_request(options)`` builds the request every configuration varies.
    """
    from qbench.engine.evaluate import resolve

    for key in spec.settings:
        plain = str(key).replace("-", "_")
        name = SETTING_ALIASES.get(plain, plain)
        if name in FORBIDDEN_SETTINGS:
            raise spec.source.error(["settings", key], f"{key!r} cannot be a setting of a sweep ({FORBIDDEN_SETTINGS[name]})")
    try:
        options = eval_options(spec.settings)
    except QbenchError as error:
        raise _setting_error(spec, error) from None
    base = base_request(options)
    quantizers = _quantizer_axis(spec, registry)
    schedule_steps = _schedule_steps(options.get("schedule"), quantizers, registry, spec)
    combos = [dict(zip(AXES, values)) for values in itertools.product(*(
        quantizers if axis == "quantizers" else spec.axes[axis] for axis in AXES))]
    chosen = [(combo, variant, None) for combo in combos if not _excluded(combo, spec.exclude, registry)
              for variant in spec.qparams.get(combo["quantizers"], ({},))]
    for rule in spec.include:
        chosen += [(combo, rule.qparams or variant, rule) for combo in _included(rule, spec, quantizers, registry)
                   for variant in ([rule.qparams] if rule.qparams else spec.qparams.get(combo["quantizers"], ({},)))]
    units: dict[str, Unit] = {}
    for combo, variant, rule in chosen:
        try:
            resolved = resolve(_request(base, combo, variant, schedule_steps, registry), registry, check_device=False)
        except QbenchError as error:
            raise _located(spec, combo, rule, error) from None
        unit = _unit(resolved, "config")
        units.setdefault(unit.config_hash, unit)
    if not units:
        raise spec.source.error([], "the grid is empty: every configuration is excluded (check the exclude rules)")
    configs = _with_siblings(sorted(units.values(), key=_run_order))
    warm = _warm_units(configs, registry) if spec.warm else []
    # a warm unit the grid already has (an fp32 configuration) is that configuration, moved to the front
    warm_hashes = {unit.config_hash for unit in warm}
    by_hash = {unit.config_hash: unit for unit in configs}
    warm = [dataclasses.replace(by_hash[unit.config_hash], stage="warm") if unit.config_hash in by_hash
            else dataclasses.replace(unit, requested=False) for unit in warm]
    return ExpandedSweep(spec, tuple(warm + [unit for unit in configs if unit.config_hash not in warm_hashes]))


def _setting_error(spec: SweepSpec, error: QbenchError) -> QbenchError:
    """A ``qbench eval`` option error of the ``settings`` section, at the line of the setting it names."""
    import re

    text = str(error)
    prefix = f"run config {spec.source.label}: "
    text = text[len(prefix):] if text.startswith(prefix) else text
    named = re.search(r"setting '([\w-]+)'|value for '--([\w-]+)'|^bad --([\w-]+)|^([\w-]+) takes one value", text)
    key = next((group for group in (named.groups() if named else ()) if group), None)
    candidates = [item for item in spec.settings if key is not None and str(item).replace("-", "_") == key.replace("-", "_")]
    return spec.source.error(["settings", candidates[0]] if candidates else ["settings"], text)


def _quantizer_axis(spec: SweepSpec, registry: "Registry") -> list[str]:
    """Quantizer names with ``family:NAME`` expanded; unknown names and families name their line."""
    names = []
    for index, value in enumerate(spec.axes["quantizers"]):
        try:
            names += expand_quantizer(value, registry)
        except QbenchError as error:
            raise spec.source.error(["quantizers", index], str(error)) from None
    for quantizer in spec.qparams:
        if quantizer not in names:
            raise spec.source.error(["qparams", quantizer], f"qparams for {quantizer!r}, which is not on the quantizers "
                                                            f"axis ({', '.join(names)})")
    return list(dict.fromkeys(names))


def expand_quantizer(value: str, registry: "Registry") -> list[str]:
    """``[value]`` for a registered name; for ``family:NAME`` the built-in quantizers of that family (installing a
    plugin must not change what a sweep file plans; third-party quantizers are named explicitly)."""
    if value.startswith("family:"):
        family = value.split(":", 1)[1]
        builtins = [entry for entry in registry.entries("quantizers") if entry.builtin]
        members = sorted(entry.name for entry in builtins if entry.value.family == family)
        if not members:
            families = sorted({entry.value.family for entry in builtins})
            raise QbenchError(f"no built-in quantizer of family {family!r} (families: {', '.join(families)}; "
                              "name a plugin's quantizer explicitly)")
        return members
    registry.get("quantizers", value)
    return [value]


def _schedule_steps(schedule: str | None, quantizers: list[str], registry: "Registry", spec: SweepSpec) -> int | None:
    if schedule is None:
        return None
    from qbench.quant.qat import schedule_steps

    try:
        steps = schedule_steps(schedule)
    except QbenchError as error:
        raise spec.source.error(["settings", "schedule"], str(error)) from None
    if not any(registry.get("quantizers", name).family == "qat" for name in quantizers):
        raise spec.source.error(["settings", "schedule"], "schedule sets the training length of QAT quantizers, and the "
                                                          "sweep has none")
    return steps


def _request(base: "EvalRequest", combo: dict[str, Any], variant: dict[str, str], steps: int | None,
             registry: "Registry") -> "EvalRequest":
    """The request of one grid point; the sweep's schedule adds ``steps`` to QAT quantizers."""
    params = tuple(variant.items())
    if steps is not None and registry.get("quantizers", combo["quantizers"]).family == "qat":
        if "steps" in variant:
            raise QbenchError(f"the sweep's schedule and qparams {combo['quantizers']}.steps both set the training "
                              "length; give one of them")
        params += (("steps", str(steps)),)
    request = dataclasses.replace(base, model=combo["models"], quantizer=combo["quantizers"], quantizer_params=params,
                                  bits=combo["bits"], scope=combo["scopes"], seed=combo["seeds"], suites=tuple(combo["suites"]))
    if (request.scorers or request.scorer_params) and not _has_ood_task(request.suites, registry):
        # the sweep's scorer settings are for its OOD suites; a configuration without one runs no scorer
        request = dataclasses.replace(request, scorers=(), scorer_params=())
    return request


def _has_ood_task(suites: Sequence[str], registry: "Registry") -> bool:
    """Whether any of ``suites`` scores OOD detection (unknown names count as yes: resolving reports them)."""
    for name in suites:
        try:
            if registry.get("suites", name).ood_tasks:
                return True
        except QbenchError:
            return True
    return False


def _excluded(combo: dict[str, Any], rules: Sequence[Rule], registry: "Registry") -> bool:
    return any(_matches(combo, rule, registry) for rule in rules)


def _matches(combo: dict[str, Any], rule: Rule, registry: "Registry") -> bool:
    for axis, accepted in rule.values.items():
        value = combo[axis]
        if axis == "quantizers":
            if not any(value in expand_quantizer(item, registry) for item in accepted):
                return False
        elif axis == "suites":
            if not any(set(value) == set(item) for item in accepted):
                return False
        elif value not in accepted:
            return False
    return True


def _included(rule: Rule, spec: SweepSpec, quantizers: list[str], registry: "Registry") -> list[dict[str, Any]]:
    axes = {}
    for axis in AXES:
        if axis not in rule.values:
            axes[axis] = quantizers if axis == "quantizers" else list(spec.axes[axis])
        elif axis == "quantizers":
            try:
                axes[axis] = [name for item in rule.values[axis] for name in expand_quantizer(item, registry)]
            except QbenchError as error:
                raise spec.source.error(list(rule.position) + ["quantizer"], str(error)) from None
        else:
            axes[axis] = list(rule.values[axis])
    return [dict(zip(AXES, values)) for values in itertools.product(*(axes[axis] for axis in AXES))]


def _located(spec: SweepSpec, combo: dict[str, Any], rule: Rule | None, error: QbenchError) -> QbenchError:
    """``error`` prefixed with the line of the axis value (or include rule) it came from."""
    text = str(error)
    if rule is not None:
        return spec.source.error(list(rule.position), text)
    quantizer = combo["quantizers"]
    if quantizer in spec.qparams and ("parameter" in text or f"{quantizer}." in text):
        return spec.source.error(["qparams", quantizer], text)
    hints = (("models", "model"), ("bits", "bit spec"), ("scopes", "scope"), ("suites", "suite"),
             ("quantizers", "quantizer"))
    for axis, word in hints:
        if word in text:
            value = combo[axis]
            values = list(spec.axes[axis])
            if value in values:
                return spec.source.error([axis, values.index(value)], text)
            return spec.source.error([axis], text)
    return spec.source.error(["settings"], text)


def _unit(resolved: "ResolvedRun", stage: str) -> Unit:
    request = resolved.request
    suites = "+".join(request.suites)
    params = ",".join(f"{key}={value}" for key, value in request.quantizer_params)
    label = f"{request.model} {request.quantizer}{f'[{params}]' if params else ''} {request.bits} {request.scope} " \
            f"seed {request.seed} {suites}"
    return Unit(request, resolved.config["config_hash"], resolved.quantization_config["config_hash"], stage,
                _group_key(request), label)


def _group_key(request: "EvalRequest") -> str:
    """What decides the FP32 model and the data: everything but the quantization axes, the suites and the scorers
    (which a configuration without an OOD suite drops)."""
    varying = dict(quantizer="", quantizer_params=(), bits="", scope="", seed=0, suites=(), logit_tuning=False,
                   threads=None, qat_checkpoint_every=0, scorers=(), scorer_params=())
    return hashlib.sha256(repr(dataclasses.replace(request, **varying)).encode()).hexdigest()[:12]


def _run_order(unit: Unit) -> tuple:
    """Model, then group, then quantization (so the configurations sharing a quantized model are adjacent)."""
    request = unit.request
    return (request.model, unit.group, request.quantizer, request.quantizer_params, request.bits, request.scope,
            request.seed, unit.quantization_hash, request.suites, unit.config_hash)


def _with_siblings(units: list[Unit]) -> list[Unit]:
    by_quantization: dict[str, list[str]] = {}
    for unit in units:
        by_quantization.setdefault(unit.quantization_hash, []).append(unit.config_hash)
    return [dataclasses.replace(unit, siblings=tuple(by_quantization[unit.quantization_hash])) for unit in units]


def _warm_units(configs: Sequence[Unit], registry: "Registry") -> list[Unit]:
    """One FP32-baseline unit per group: the union of its suites, its first bits and lowest seed, visual scope."""
    from qbench.engine.evaluate import resolve

    groups: dict[str, list[Unit]] = {}
    for unit in configs:
        groups.setdefault(unit.group, []).append(unit)
    warm = []
    for members in groups.values():
        first = members[0].request
        scored = next((unit.request for unit in members if unit.request.scorers or unit.request.scorer_params), first)
        suites = tuple(dict.fromkeys(name for unit in members for name in unit.request.suites))
        request = dataclasses.replace(first, quantizer=WARM_QUANTIZER, quantizer_params=(), scope="visual",
                                      seed=min(unit.request.seed for unit in members), suites=suites,
                                      logit_tuning=False, scorers=scored.scorers, scorer_params=scored.scorer_params)
        warm.append(_unit(resolve(request, registry, check_device=False), "warm"))
    return warm


# -- state of a sweep ----------------------------------------------------------------------------------
STATES = ("done", "running", "failed", "pending")


@dataclass(frozen=True)
class UnitState:
    """Where one unit stands: ``done`` (its document is stored), ``running`` (a live process holds its lock),
    ``failed`` (its last attempt failed; ``detail`` is the one-line error) or ``pending``."""

    state: str
    detail: str = ""


def unit_states(sweep: ExpandedSweep, store) -> dict[str, UnitState]:
    """The state of every unit from the store's files (one listing per folder, no document is parsed)."""
    from qbench.engine.locks import holder_alive, read_holder

    done = store.stored_hashes()
    failed = store.failed_hashes()
    states = {}
    for unit in sweep.units:
        config_hash = unit.config_hash
        if config_hash in done:
            states[config_hash] = UnitState("done")
            continue
        lock_path = store.locks_dir / f"{config_hash}.lock"
        holder = read_holder(lock_path) if lock_path.exists() else None
        if holder is not None and holder_alive(holder):
            states[config_hash] = UnitState("running", holder.describe())
        elif config_hash in failed:
            record = store.failure(config_hash) or {}
            where = f" ({record.get('host')}, {record.get('at')})" if record.get("host") else ""
            states[config_hash] = UnitState("failed", f"{record.get('error', 'failed')}{where}")
        else:
            states[config_hash] = UnitState("pending")
    return states


def state_counts(states: dict[str, UnitState]) -> dict[str, int]:
    counts = {state: 0 for state in STATES}
    for item in states.values():
        counts[item.state] += 1
    return counts
