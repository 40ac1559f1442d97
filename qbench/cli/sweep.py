"""``qbench sweep plan|run|status``: a study grid from a sweep file (or ``qbench eval``'s flags) on submitit.

See :mod:`qbench.engine.sweep` for the file format and :mod:`qbench.engine.sweep_jobs` for the executors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import click
from rich.table import Table

from qbench.cli import (QbenchError, ResourceOptionsCommand, eval_base_request, eval_command, eval_options_from_settings,
                        network_policy, registry, scorer_resource_options, stderr, stdout_console, store_option,
                        threads_option)

AXIS_FLAGS = {"model": "models", "quantizers": "quantizers", "bits_list": "bits", "scope": "scopes"}
"""``qbench eval`` parameter -> sweep axis, for sweeps given by flags."""
NOT_FOR_SWEEPS = {"config", "checkpoint_dir", "as_json", "force", "markdown_path", "plots_dir", "store_path", "threads"}


def sweep_options(function: Callable) -> Callable:
    """``[FILE]`` plus ``qbench eval``'s grid and settings flags (``--model`` and ``--scope`` repeatable here).

    Flags given on the command line replace the file's value of the same axis or setting. The scorer resource
    options plugins declare come with the command class (:class:`~qbench.cli.ResourceOptionsCommand`).
    """
    function = click.argument("sweep_file", required=False, type=click.Path(dir_okay=False))(function)
    function = click.option("--sweep-dir", type=click.Path(file_okay=False), default=None,
                            help="Folder for the sweep's job logs and submission records (default: sweeps/NAME-HASH "
                                 "in the store folder).")(function)
    memo = function.__dict__.setdefault("__click_params__", [])
    for param in reversed(eval_command.params):
        if param.name in NOT_FOR_SWEEPS:
            continue
        if param.name in ("model", "scope"):
            memo.append(click.Option([f"--{param.name}"], multiple=True,
                                     help=f"{param.help} Repeat for several (a sweep axis)."))
        else:
            memo.append(copy.copy(param))
    return store_option(function)


def load_sweep(ctx: click.Context, sweep_file: str | None):
    """The sweep of ``FILE`` with the command line's flags applied, expanded into units (every name checked)."""
    from qbench.engine.sweep import SweepSource, expand, parse_spec, read_sweep_file

    if sweep_file is not None:
        data, source = read_sweep_file(sweep_file)
    else:
        data, source = {"version": 1}, SweepSource("the command line")
    axes, settings = _flag_overrides(ctx)
    data = {**data, **axes}
    if settings:
        if not isinstance(data.get("settings") or {}, dict):
            raise QbenchError(f"{source.where('settings')}: settings is a mapping of 'qbench eval' options")
        data["settings"] = {**(data.get("settings") or {}), **settings}
    spec = parse_spec(data, source)
    network_policy(bool(spec.settings.get("allow_download") or spec.settings.get("allow-download")))
    return expand(spec, registry(), lambda settings: eval_options_from_settings(settings, source.label), eval_base_request)


def _flag_overrides(ctx: click.Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """Axes (and qparams) and settings given as flags: only those typed on the command line."""
    from click.core import ParameterSource

    from qbench.cli import _parse_sparams

    given = {name: value for name, value in ctx.params.items()
             if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
    axes: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for name, value in given.items():
        if name not in EVAL_FLAGS and name not in {option.name for option in scorer_resource_options()}:
            continue  # the sweep command's own options (executor, slurm resources, output)
        if name in AXIS_FLAGS:
            axes[AXIS_FLAGS[name]] = list(value) if isinstance(value, tuple) else [value]
        elif name == "suites":
            axes["suites"] = [list(value)]  # like 'qbench eval': the --suite values form one configuration
        elif name in ("seed", "seeds"):
            axes["seeds"] = list(range(value)) if name == "seeds" else list(value)
        elif name == "qparam":
            quantizers = list(given.get("quantizers") or ())
            if len(quantizers) != 1:
                raise QbenchError("--qparam applies to one quantizer: give exactly one --quantizer with it, or use a "
                                  "sweep file's qparams section")
            axes["qparams"] = {quantizers[0]: dict(_pair(item) for item in value)}
        elif name == "sparam":
            nested: dict[str, dict[str, str]] = {}
            for scorer, key, raw in _parse_sparams(value):
                nested.setdefault(scorer, {})[key] = raw
            settings["sparams"] = nested
        else:
            settings[name] = list(value) if isinstance(value, tuple) else value
    return axes, settings


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise QbenchError(f"bad --qparam {text!r}: use NAME=VALUE, e.g. --qparam n_calibration=512")
    return key.strip(), value.strip()


EVAL_FLAGS = frozenset(param.name for param in eval_command.params) - NOT_FOR_SWEEPS
"""The ``qbench eval`` options a sweep command accepts as flags (they set axes or settings)."""


def _open_store(store_path: str | None, index: bool = True):
    from qbench.engine.store import ResultStore

    return ResultStore(store_path, index=None if index else False)


def _sweep_folder(sweep, store, sweep_dir: str | None) -> Path:
    if sweep_dir:
        return Path(sweep_dir).expanduser()
    return store.root / "sweeps" / f"{sweep.spec.name}-{sweep.spec.digest}"


@click.group("sweep")
def sweep_group() -> None:
    """Run a study grid as jobs (SLURM arrays, local workers) with results that survive crashes and requeues."""


@sweep_group.command("plan", cls=ResourceOptionsCommand)
@sweep_options
@click.option("--json", "as_json", is_flag=True, help="Print the units as one JSON object.")
@click.pass_context
def plan_command(ctx, sweep_file, sweep_dir, store_path, as_json, **_) -> None:
    """The sweep's configurations with their config hashes, stage and state (done, running, failed, pending)."""
    from qbench.engine.sweep import state_counts, unit_states

    sweep = load_sweep(ctx, sweep_file)
    store = _open_store(store_path, index=False)
    states = unit_states(sweep, store)
    if as_json:
        click.echo(json.dumps({"sweep": sweep.spec.name, "digest": sweep.spec.digest, "units": [
            {**_unit_json(unit), "state": states[unit.config_hash].state} for unit in sweep.units]}))
        return
    table = Table(title=f"sweep {sweep.spec.name} ({len(sweep.configs)} configurations"
                        f"{f', {len(sweep.units) - len(sweep.configs)} added warm unit(s)' if len(sweep.units) > len(sweep.configs) else ''})",
                  title_justify="left")
    for column in ("stage", "model", "quantizer", "params", "bits", "scope", "seed", "suites", "config", "state"):
        table.add_column(column, overflow="fold")
    for unit in sweep.units:
        request = unit.request
        params = ", ".join(f"{key}={value}" for key, value in request.quantizer_params) or "-"
        table.add_row(unit.stage, request.model, request.quantizer, params, request.bits, request.scope, str(request.seed),
                      "+".join(request.suites), unit.config_hash, states[unit.config_hash].state)
    stdout_console().print(table)
    counts = state_counts({unit.config_hash: states[unit.config_hash] for unit in sweep.configs})
    stderr.print(_counts_line(counts) + f"; store {store.root}", highlight=False)


@sweep_group.command("status", cls=ResourceOptionsCommand)
@sweep_options
@click.option("--json", "as_json", is_flag=True, help="Print every unit's state as one JSON object.")
@click.option("--only", "only", type=click.Choice(["done", "running", "failed", "pending"]), multiple=True,
              help="List only units in this state (repeatable); the counts still cover the whole sweep.")
@click.pass_context
def status_command(ctx, sweep_file, sweep_dir, store_path, as_json, only, **_) -> None:
    """Done / running / failed (with the one-line error) / pending, and the index brought up to date."""
    from qbench.engine.sweep import state_counts, unit_states

    sweep = load_sweep(ctx, sweep_file)
    store = _open_store(store_path)
    sync = store.sync_index()
    states = unit_states(sweep, store)
    counts = state_counts({unit.config_hash: states[unit.config_hash] for unit in sweep.configs})
    listed = [unit for unit in sweep.units if not only or states[unit.config_hash].state in only]
    if as_json:
        click.echo(json.dumps({"sweep": sweep.spec.name, "counts": counts, "index": sync.error or "up to date",
                               "units": [{**_unit_json(unit), "state": states[unit.config_hash].state,
                                          "detail": states[unit.config_hash].detail} for unit in listed]}))
        return
    table = Table(title=f"sweep {sweep.spec.name}: {_counts_line(counts)}", title_justify="left")
    for column in ("state", "stage", "configuration", "config", "detail"):
        table.add_column(column, overflow="fold")
    style = {"done": "green", "running": "cyan", "failed": "red", "pending": "dim"}
    for unit in listed:
        state = states[unit.config_hash]
        table.add_row(f"[{style[state.state]}]{state.state}[/{style[state.state]}]", unit.stage, unit.label,
                      unit.config_hash, state.detail)
    stdout_console().print(table)
    if sync.error:
        stderr.print(f"[yellow]note[/yellow]: index not updated ({sync.error}); the states above come from the result "
                     "files", highlight=False)


@sweep_group.command("run", cls=ResourceOptionsCommand)
@sweep_options
@click.option("--executor", type=click.Choice(["local", "slurm", "debug"]), default="local", show_default=True,
              help="local: worker processes on this machine; slurm: job arrays via sbatch; debug: in this process.")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="Local workers, or SLURM array tasks running at once (default: 1 local worker; 64 array tasks).")
@click.option("--partition", default=None, help="SLURM partition.")
@click.option("--gpus", type=click.IntRange(min=0), default=None, help="GPUs per SLURM task.")
@click.option("--cpus", type=click.IntRange(min=1), default=None, help="CPUs per SLURM task (also its torch threads).")
@click.option("--time", default=None, help="SLURM time limit per task: minutes or H:MM:SS (default 4:00:00).")
@click.option("--account", default=None, help="SLURM account.")
@click.option("--qos", default=None, help="SLURM quality of service.")
@click.option("--mem", default=None, help="SLURM memory per node, e.g. 64G.")
@click.option("--slurm-setup", multiple=True, help="A shell line run before each SLURM task (module load, conda activate); repeatable.")
@click.option("--units-per-job", type=click.IntRange(min=1), default=None,
              help="Units per SLURM array task (default: as few as keep the array within 1000 tasks).")
@click.option("--retry-failed", is_flag=True, help="Also submit units whose last attempt failed.")
@click.option("--wait/--no-wait", default=None,
              help="Wait and show progress until the jobs end (default: wait for local and debug, not for slurm).")
@threads_option
@click.pass_context
def run_command(ctx, sweep_file, sweep_dir, store_path, executor, max_parallel, partition, gpus, cpus, time, account,
                qos, mem, slurm_setup, units_per_job, retry_failed, wait, threads, **_) -> None:
    """Submit every unit that is not stored, not running and (unless --retry-failed) not failed."""
    from qbench.engine.sweep import unit_states

    sweep = load_sweep(ctx, sweep_file)
    store = _open_store(store_path)
    folder = _sweep_folder(sweep, store, sweep_dir)
    states = unit_states(sweep, store)
    todo = units_to_submit(sweep, states, retry_failed)
    if not todo:
        failed = any(states[unit.config_hash].state == "failed" for unit in sweep.configs)
        stderr.print(f"nothing to submit: {_summary(sweep, states)}"
                     + ("; pass --retry-failed to run the failed ones again" if failed and not retry_failed else ""),
                     highlight=False)
        _exit_for(sweep, states)
        return
    _clean_partials(store, sweep)
    options = eval_options_from_settings(sweep.spec.settings, sweep.spec.source.label)
    watch = f"watch with: qbench sweep status {sweep_file or '(the same flags)'}"
    if executor == "slurm":
        slurm = _slurm_options(sweep.spec.slurm, partition, gpus, cpus, time, account, qos, mem, slurm_setup)
        jobs = _submit_slurm(sweep, todo, store, folder, slurm, options, threads, max_parallel, units_per_job)
        stderr.print(f"logs in {folder / 'logs'}; {watch}", highlight=False)
        if not wait:
            return
    else:
        jobs = _start_workers(executor, todo, store, folder, options, threads, max_parallel or 1)
        if executor == "local" and wait is False:
            stderr.print(f"the workers go on in the background; {watch}", highlight=False)
            return
    _wait(sweep, store, jobs, executor)


def units_to_submit(sweep, states, retry_failed: bool) -> list:
    """Pending units (and failed ones with ``retry_failed``); a warm unit only for a group with work left."""
    wanted = {"pending", "failed"} if retry_failed else {"pending"}
    todo = [unit for unit in sweep.units if states[unit.config_hash].state in wanted]
    groups_with_work = {unit.group for unit in todo if unit.requested}
    return [unit for unit in todo if unit.requested or unit.group in groups_with_work]


def _clean_partials(store, sweep) -> None:
    """Half-written files of killed writers: in the store and in every cache the sweep uses (older qbench
    versions left theirs beside the cache entries, so the caches are walked once here)."""
    from qbench.atomic import remove_legacy_partials, remove_orphan_partials

    remove_orphan_partials(store.root)
    for root in _cache_roots(sweep):
        remove_orphan_partials(root)
        remove_legacy_partials(root)


def _submit_slurm(sweep, todo, store, folder: Path, slurm, options: dict[str, Any], threads: int | None,
                  max_parallel: int | None, units_per_job: int | None) -> list:
    """The warm units as one job array, the configurations as a second one that waits for it."""
    from qbench.engine.sweep_jobs import JobSettings, Submission, submit_slurm

    settings = JobSettings(str(store.path), index=False, threads=threads, executor_threads=None,
                           keep_quantized=bool(options.get("keep_quantized")),
                           allow_download=bool(options.get("allow_download")))
    stages = [[unit for unit in todo if unit.stage == "warm"], [unit for unit in todo if unit.stage == "config"]]
    parallel = max_parallel or int(sweep.spec.slurm.get("max_parallel", 64))
    jobs = submit_slurm(stages, settings, folder, slurm, parallel, units_per_job or sweep.spec.slurm.get("units_per_job"))
    arrays = sorted({job.job_id.split("_")[0] for job in jobs})
    Submission("slurm", arrays, [unit.config_hash for unit in todo]).record(folder)
    stderr.print(f"submitted {len(todo)} unit(s) as {len(jobs)} SLURM task(s) (job {', '.join(arrays)})", highlight=False)
    return jobs


def _start_workers(executor: str, todo, store, folder: Path, options: dict[str, Any], threads: int | None,
                   workers: int) -> list:
    """``workers`` local processes (or, for ``debug``, the same workers run here, one after the other)."""
    from qbench.engine.sweep_jobs import JobSettings, Submission, submit_debug, submit_local
    from qbench.engine.threads import usable_cores

    share = max(1, usable_cores() // workers)
    settings = JobSettings(str(store.path), index=True, threads=threads, executor_threads=share,
                           keep_quantized=bool(options.get("keep_quantized")),
                           allow_download=bool(options.get("allow_download")))
    jobs = (submit_local if executor == "local" else submit_debug)(todo, settings, folder, workers)
    Submission(executor, [str(job.job_id) for job in jobs], [unit.config_hash for unit in todo]).record(folder)
    stderr.print(f"started {workers} {executor} worker(s) ({threads or share} torch thread(s) each) for {len(todo)} "
                 f"unit(s); logs in {folder / 'logs'}", highlight=False)
    if executor == "debug":
        for job in jobs:
            try:
                job.result()
            except Exception as error:  # noqa: BLE001 - submitit wraps the worker's failure with its traceback
                detail = (str(error).strip().splitlines() or [""])[-1]
                raise QbenchError(f"the debug worker failed ({type(error).__name__}: {detail}); see {folder / 'logs'}") from None
    return jobs


def _wait(sweep, store, jobs, executor: str) -> None:
    from qbench.engine.sweep import state_counts, unit_states
    from qbench.engine.sweep_jobs import wait_for

    def counts():
        states = unit_states(sweep, store)
        return state_counts({unit.config_hash: states[unit.config_hash] for unit in sweep.configs})

    try:
        wait_for(jobs, counts, on_change=lambda current: stderr.print(_counts_line(current), highlight=False))
    except KeyboardInterrupt:
        stderr.print("stopped waiting; the workers go on (watch with 'qbench sweep status')", highlight=False)
        raise SystemExit(130) from None
    store.sync_index()
    states = unit_states(sweep, store)
    for unit in sweep.units:
        if states[unit.config_hash].state == "failed":
            stderr.print(f"[red]failed[/red] {unit.config_hash} {unit.label}: {states[unit.config_hash].detail}",
                         highlight=False, soft_wrap=True)
    running = sum(1 for unit in sweep.configs if states[unit.config_hash].state == "running")
    if running:
        stderr.print(f"{running} configuration(s) are being computed by other processes", highlight=False)
    left = sum(1 for unit in sweep.configs if states[unit.config_hash].state == "pending")
    if left:
        # every job of this run has ended without them: a worker was killed (OOM killer, kill -9, a lost node)
        stderr.print(f"[yellow]{left} configuration(s) left unfinished[/yellow] although every job has ended "
                     f"(a worker was killed?); 'qbench sweep run' again resumes them", highlight=False)
        raise SystemExit(1)
    _exit_for(sweep, states)


def _exit_for(sweep, states) -> None:
    """Exit status 1 when a configuration of the sweep failed (the failures were listed above)."""
    if any(states[unit.config_hash].state == "failed" for unit in sweep.configs):
        raise SystemExit(1)


def _summary(sweep, states) -> str:
    from qbench.engine.sweep import state_counts

    return _counts_line(state_counts({unit.config_hash: states[unit.config_hash] for unit in sweep.configs}))


def _counts_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return f"{counts['done']}/{total} done, {counts['running']} running, {counts['failed']} failed, {counts['pending']} pending"


def _cache_roots(sweep) -> list[Path]:
    from qbench.engine.evaluate import feature_cache_root

    roots = {feature_cache_root(unit.request) for unit in sweep.units} - {None}
    return sorted(root for root in roots if root.is_dir())


def _slurm_options(defaults: dict[str, Any], partition, gpus, cpus, time, account, qos, mem, setup):
    from qbench.engine.sweep_jobs import SlurmOptions, parse_time_minutes

    def pick(flag, key):
        return flag if flag is not None else defaults.get(key)

    setup_lines = tuple(setup) or tuple(defaults.get("setup") or ())
    additional = defaults.get("additional") or {}  # checked when the sweep file was read
    return SlurmOptions(partition=pick(partition, "partition"), gpus=pick(gpus, "gpus"), cpus=pick(cpus, "cpus"),
                        time_min=parse_time_minutes(pick(time, "time") or "4:00:00"), account=pick(account, "account"),
                        qos=pick(qos, "qos"), mem=pick(mem, "mem"), constraint=defaults.get("constraint"),
                        setup=setup_lines, additional=dict(additional))


def _unit_json(unit) -> dict[str, Any]:
    request = unit.request
    return {"config_hash": unit.config_hash, "stage": unit.stage, "requested": unit.requested, "model": request.model,
            "quantizer": request.quantizer,
            "quantizer_params": dict(request.quantizer_params), "bits": request.bits, "scope": request.scope,
            "seed": request.seed, "suites": list(request.suites), "quantization_hash": unit.quantization_hash}
