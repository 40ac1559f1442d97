"""The ``qbench`` command line: list plugins, evaluate, export results, render the leaderboard.

User errors (:class:`~qbench.errors.QbenchError`) print one line, ``qbench: <what and how to fix>``,
and exit with status 2; no traceback. Machine-readable output goes to stdout, progress and logs to
stderr. Heavy libraries (torch, open_clip) are imported only by the commands that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click
from rich.console import Console
from rich.table import Table

from qbench import __version__
from qbench.errors import QbenchError
from qbench.registry import shared_registry as registry  # built on first use, shared by every command

stderr = Console(stderr=True)
DATA_ENV = "QBENCH_DATA"
DEFAULT_SUBMISSIONS = Path("leaderboard") / "submissions"
DEFAULT_LEADERBOARD = Path("leaderboard") / "README.md"


def stdout_console() -> Console:
    """The console for tables on stdout; wide when piped, so no column is cut to an ellipsis."""
    return Console(width=None if sys.stdout.isatty() else 160)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the click group, turning user errors into one line."""
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    try:
        cli.main(args=argv, prog_name="qbench", standalone_mode=False)
    except QbenchError as error:
        stderr.print(f"qbench: {one_line(str(error))}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        stderr.print("qbench: aborted", markup=False)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as error:  # 'qbench' or 'qbench sweep' alone: the help text
        error.show()
        sys.exit(error.exit_code)
    except click.ClickException as error:  # bad option values, unknown options, missing arguments: one line too
        stderr.print(f"qbench: {click_error_line(error)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("qbench: interrupted; results of finished evaluations are in the store", markup=False)
        sys.exit(130)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(text.split())


RUN_CONFIG_META = "qbench.run_config"
"""``ctx.meta`` key under which ``--config`` records its file and which setting came from which YAML key."""


def click_error_line(error: click.ClickException) -> str:
    """One line for a click error (bad value, unknown option, missing argument): what is wrong and where to look.

    A bad value that came from a ``--config`` file names the file and its key instead of the option."""
    from click.core import ParameterSource

    ctx = getattr(error, "ctx", None)
    command = ctx.command_path if ctx is not None and ctx.command_path not in ("", "-") else "qbench"
    param = getattr(error, "param", None)
    run_config = ctx.meta.get(RUN_CONFIG_META) if ctx is not None else None
    if (isinstance(error, click.BadParameter) and param is not None and param.name and run_config is not None
            and ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT_MAP):
        key = run_config["keys"].get(param.name, param.name)
        option = param.opts[0] if getattr(param, "opts", None) else param.name
        return (f"run config {run_config['path']}: {key}: {one_line(error.message).rstrip('.')}; fix that value "
                f"in the file (or give {option} on the command line)")
    message = one_line(error.format_message()).rstrip(".")
    where = command.removeprefix("qbench").strip()
    return f"{where + ': ' if where else ''}{message}; see '{command} --help'"


# -- what plugins add to the command line ----------------------------------------------------------
class BuiltinDefault:
    """A click default taken from the built-in plugins' :class:`~qbench.builtins.EvalDefaults` (``field``), read
    when a command is parsed or its help shown, never at import. ``str()`` gives the value, so ``--help`` shows
    it instead of click's ``(dynamic)``; ``many`` gives a one-item tuple for a repeatable option."""

    def __init__(self, field: str, *, many: bool = False) -> None:
        self.field = field
        self.many = many

    def __call__(self) -> Any:
        from qbench.builtins import eval_defaults

        value = getattr(eval_defaults(), self.field)
        return (value,) if self.many and isinstance(value, str) else value

    def __str__(self) -> str:
        value = self()
        return ", ".join(value) if isinstance(value, tuple) else str(value)


def _source_of(manager: Any, plugin: object) -> str:
    """A readable name of a registered plugin for warnings (its distribution when it has one)."""
    from qbench.plugins import plugin_source

    try:
        return str(plugin_source(manager, plugin))
    except Exception:  # a minimal manager without origins: its registration name
        return str(manager.get_name(plugin) or plugin)


def _command_manager() -> Any:
    """A plugin manager to ask for commands. With no third-party ``qbench`` entry point installed, only the
    built-in modules that add commands are registered (``qbench_plugins.COMMAND_PLUGINS``, light to import), so
    ``qbench --help`` stays quick; otherwise every plugin, exactly as the registry loads them."""
    import importlib
    import importlib.metadata

    import pluggy

    from qbench import hookspecs
    from qbench.builtins import command_plugin_modules
    from qbench.plugins import get_plugin_manager

    if importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        return get_plugin_manager()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for module_name in command_plugin_modules():
        manager.register(importlib.import_module(module_name), name=f"builtin:{module_name}")
    return manager


@functools.cache
def plugin_commands() -> dict[str, click.Command]:
    """The commands plugins add through ``qbench_register_commands``, by name (built-in plugins first).

    A command named like a core command, one registered twice, or a result that is not a list of click
    commands is skipped with one warning naming the plugin; everything else keeps working.
    """
    from qbench.errors import warn

    manager = _command_manager()
    commands: dict[str, click.Command] = {}
    for implementation in manager.hook.qbench_register_commands.get_hookimpls():
        source = _source_of(manager, implementation.plugin)
        try:
            result = implementation.function()
        except Exception as error:  # a broken plugin must not take the command line down
            warn(f"plugin {source} could not register its commands ({type(error).__name__}: "
                 f"{(str(error).splitlines() or [''])[0]}); they are skipped")
            continue
        if not isinstance(result, (list, tuple)):
            warn(f"plugin {source}: qbench_register_commands must return a list of click commands, got "
                 f"{type(result).__name__}; skipped")
            continue
        for command in result:
            name = getattr(command, "name", None)
            if not isinstance(command, click.Command) or not name:
                warn(f"plugin {source} registered a command that is not a named click.Command ({command!r}); skipped")
            elif name in cli.commands:
                warn(f"plugin {source}: command {name!r} is a built-in qbench command; skipped")
            elif name in commands:
                warn(f"plugin {source}: command {name!r} was already added by another plugin; skipped")
            else:
                commands[name] = command
    return commands


class QbenchGroup(click.Group):
    """The ``qbench`` group: the core's commands, then the commands plugins add (:func:`plugin_commands`),
    looked up only when a name is not a core command or when the commands are listed (``qbench --help``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *plugin_commands()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        return command if command is not None else plugin_commands().get(cmd_name)


_RESOURCE_OPTIONS: list[Any] = []
"""``[registry, options]`` of the last :func:`scorer_resource_options` call (rebuilt when the registry changes)."""


def scorer_resource_options() -> list[click.Option]:
    """One ``qbench eval`` option per scorer resource that a registered scorer declares with a flag.

    Built from the registry when a command that takes them is parsed (or its help shown), never at import; the
    same option objects are returned until :func:`registry` gives another registry. A declared flag or key that
    a core option already uses is skipped with one warning (the resource stays available as ``--resource``).
    """
    from qbench.errors import warn

    current = registry()
    if _RESOURCE_OPTIONS and _RESOURCE_OPTIONS[0] is current:
        return _RESOURCE_OPTIONS[1]
    taken_opts = {opt for param in eval_command.params for opt in param.opts}
    taken_names = {param.name for param in eval_command.params}
    options = []
    for declared in declared_scorer_resources().values():
        if declared.flag is None:
            continue
        if declared.flag in taken_opts or declared.key in taken_names:
            warn(f"scorer resource {declared.key!r} ({declared.flag}) clashes with a qbench eval option; use "
                 f"--resource {declared.key}=VALUE")
            continue
        kind = click.Path() if declared.kind != "value" else click.STRING
        options.append(click.Option([declared.flag, declared.key], type=kind, default=None, help=declared.help))
    _RESOURCE_OPTIONS[:] = [current, options]
    return options


def declared_scorer_resources() -> dict[str, Any]:
    """Every :class:`~qbench.scoring.ResourceOption` the registered scorers declare, by key."""
    from qbench.scoring import declared_resources

    return declared_resources(entry.value for entry in registry().entries("scorers"))


class ResourceOptionsCommand(click.Command):
    """A command that also takes the scorer resources plugins declare (:func:`scorer_resource_options`)."""

    def resource_params(self) -> list[click.Parameter]:
        """The plugin-declared options of this command (built when first needed), less any whose flag or name
        one of this command's own options already has (a sweep command's; it stays reachable as --resource)."""
        own_opts = {opt for param in self.params for opt in param.opts}
        own_names = {param.name for param in self.params}
        return [option for option in scorer_resource_options()
                if option.name not in own_names and not own_opts.intersection(option.opts)]

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        help_option = self.get_help_option(ctx)
        core = [param for param in params if param is not help_option]
        return [*core, *self.resource_params(), *([help_option] if help_option is not None else [])]


def command_params(command: click.Command) -> list[click.Parameter]:
    """Every parameter of ``command``, with the plugin-declared ones of a :class:`ResourceOptionsCommand`."""
    extra = command.resource_params() if isinstance(command, ResourceOptionsCommand) else []
    return [*command.params, *extra]


@click.group(cls=QbenchGroup)
@click.version_option(__version__, prog_name="qbench")
def cli() -> None:
    """Measure what quantization does to vision-language models beyond accuracy."""


# -- list ----------------------------------------------------------------------------------------
def _describe(kind: str, value: Any) -> dict[str, str]:
    if kind == "models":
        return {"tier": value.tier or "-", "architecture": f"{value.family} · {value.arch}",
                "pretraining": value.pretraining_data, "weights tag": value.weights_tag,
                "local": "yes" if value.weights_available() else "no"}
    if kind == "quantizers":
        defaults = ", ".join(f"{key}={val}" for key, val in value.defaults().items()) or "-"
        return {"details": f"{value.family} · {value.summary}", "defaults": defaults}
    if kind == "scorers":
        defaults = ", ".join(f"{key}={val}" for key, val in value.defaults().items()) or "-"
        return {"details": value.summary, "defaults": defaults}
    if kind == "suites":
        return {"details": f"v{value.version} · {value.description}", "datasets": ", ".join(value.datasets)}
    if kind == "datasets":
        return {"details": f"{value.role} · {value.description}"}
    if kind == "task_types":
        return {"details": str(getattr(value, "summary", "") or "-")}
    return {"details": value.description}


def _list_kinds() -> list[str]:
    """The plugin kinds ``qbench list`` accepts, in listing order (the registry's, so a new kind appears)."""
    from qbench.registry import KIND_HOOKS

    return list(KIND_HOOKS)


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(_list_kinds()))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: per kind, each item's name, distribution, version, source and details.")
def list_command(kind: str | None, as_json: bool) -> None:
    """List registered plugins of one KIND (default: all), with the package (distribution and version) and
    plugin that registered each."""
    kinds = [kind] if kind else list(registry())
    if as_json:
        listing = {current: [{"name": entry.name, "distribution": entry.distribution, "version": entry.version,
                              "source": entry.source, "builtin": entry.builtin, **_describe(current, entry.value)}
                             for entry in registry().entries(current)] for current in kinds}
        click.echo(json.dumps(listing, indent=2, ensure_ascii=False))
        return
    console = stdout_console()
    for current in kinds:
        rows = [(entry.name, _describe(current, entry.value), entry.label) for entry in registry().entries(current)]
        table = Table(title=current, title_justify="left")
        table.add_column("name", style="bold", no_wrap=True)
        extra_columns = list(rows[0][1]) if rows else ["details"]
        for column in extra_columns:
            table.add_column(column, overflow="fold")
        table.add_column("source", style="dim", overflow="fold")
        for name, described, source in rows:
            table.add_row(name, *(described.get(column, "") for column in extra_columns), source)
        console.print(table)


# -- eval ----------------------------------------------------------------------------------------
class RichProgress:
    """Progress bars and log lines on stderr."""

    def log(self, message: str) -> None:
        stderr.print(f"[dim]·[/dim] {message}")

    def track(self, items: Sequence, description: str) -> Iterator:
        from rich.progress import track

        return iter(track(items, description=description, console=stderr, transient=True))

    @contextlib.contextmanager
    def training(self, description: str) -> Iterator[Callable[[int, int, float], None]]:
        """A bar with step, loss, elapsed time and ETA, fed by a training quantizer's ``(step, total, loss)``."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("training {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=stderr, transient=True) as bar:
            task: list[Any] = []

            def update(step: int, total: int, loss: float) -> None:
                if not task:
                    task.append(bar.add_task(description, total=total, loss="-"))
                bar.update(task[0], completed=step, loss=f"{loss:.4f}")

            yield update


def _parse_qparams(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep or not key.strip():
            raise QbenchError(f"bad --qparam {value!r}: use NAME=VALUE, e.g. --qparam n_calibration=512")
        pairs.append((key.strip(), raw.strip()))
    return tuple(pairs)


def _parse_sparams(values: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    triples = []
    for value in values:
        target, sep, raw = value.partition("=")
        scorer, dot, key = target.partition(".")
        if not sep or not dot or not scorer.strip() or not key.strip():
            raise QbenchError(f"bad --sparam {value!r}: use SCORER.NAME=VALUE (a scorer's parameters: 'qbench list scorers')")
        triples.append((scorer.strip(), key.strip(), raw.strip()))
    return tuple(triples)


def _count_or_auto(minimum: int, example: int) -> Callable[[click.Context, click.Parameter, Any], int | None]:
    """Click callback: ``auto`` -> ``None`` (chosen from the device), else an integer >= ``minimum``."""
    from qbench.engine.batching import parse_count

    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> int | None:
        from click.core import ParameterSource

        try:
            return parse_count(value, param.opts[0], minimum, example)
        except QbenchError as error:
            if ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT_MAP:
                raise click.BadParameter(str(error), ctx, param) from None  # named by its run-config file and key
            raise

    return parse


def batching_options(function: Callable) -> Callable:
    """``--batch-size`` and ``--workers``: speed settings, recorded in provenance but not in the config hash."""
    options = (
        click.option("--workers", default="auto", show_default=True, metavar="N|auto", callback=_count_or_auto(0, 4),
                     help="Image decoding/preprocessing processes; 0 decodes in the main process "
                          "(auto: none on 1-2 cores, else about half the cores on CPU, all but one beside a GPU)."),
        click.option("--batch-size", default="auto", show_default=True, metavar="N|auto", callback=_count_or_auto(1, 64),
                     help="Images per decode/encode batch (auto: from free GPU memory or available RAM); halved "
                          "automatically on a CUDA out-of-memory error. Not in the config hash; a quantizer's own "
                          "calibration/training batch is a --qparam."),
    )
    for option in options:
        function = option(function)
    return function


def threads_option(function: Callable) -> Callable:
    """``--threads``: torch CPU threads (default: $SLURM_CPUS_PER_TASK in a SLURM job, else the usable cores)."""
    return click.option("--threads", type=WholeNumber(min=1), default=None,
                        help="Torch CPU threads (default: $SLURM_CPUS_PER_TASK inside a SLURM job, else the cores this "
                             "process may use); recorded in the provenance.")(function)


def store_option(function: Callable) -> Callable:
    return click.option("--store", "store_path", type=click.Path(),
                        help="Results store: a folder, or an index file NAME.sqlite whose documents live in the folder "
                             "NAME/ beside it (default $QBENCH_STORE or ~/.cache/qbench/results.sqlite).")(function)


def weights_options(function: Callable) -> Callable:
    """``--hf-cache``, ``--allow-download`` and ``--random-init``: where pretrained weights may come from."""
    options = (
        click.option("--random-init", is_flag=True,
                     help="Build the model's architecture with random weights (smoke runs; results are stamped and "
                          "refused by the leaderboard)."),
        click.option("--allow-download", is_flag=True,
                     help="Let pretrained models download missing weights from the Hugging Face Hub (off: never touch the network)."),
        click.option("--hf-cache", type=click.Path(file_okay=False), default=None,
                     help="Hugging Face hub cache holding pretrained weights (default $HF_HUB_CACHE or ~/.cache/huggingface/hub)."),
    )
    for option in options:
        function = option(function)
    return function


def network_policy(allow_download: bool) -> None:
    """Without ``--allow-download``, set ``HF_HUB_OFFLINE=1`` before huggingface_hub is imported (it reads the
    variable once, at import): no library can then spend ~46 s per model timing out on a missing file."""
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load_run_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """``--config run.yaml``: the file's settings become defaults; flags given on the command line win."""
    if value is None:
        return
    import yaml

    try:
        raw = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise QbenchError(f"cannot read run config {value}: it is not UTF-8 text; pass a YAML file such as "
                          "'bits: w4a8'") from None
    except (OSError, yaml.YAMLError) as error:
        raise QbenchError(f"cannot read run config {value}: {one_line(str(error).splitlines()[0])}; fix the YAML "
                          "(keys are the long option names, e.g. 'bits: w4a8')") from None
    if not isinstance(raw, dict):
        raise QbenchError(f"run config {value} must be a mapping of settings, e.g. 'bits: w4a8'")
    ctx.default_map = {**(ctx.default_map or {}), **_run_config_defaults(raw, value, ctx.command)}
    known = {param.name for param in command_params(ctx.command)}
    settings = {_setting_name(key, known): (str(key), setting) for key, setting in raw.items()}
    ctx.meta[RUN_CONFIG_META] = {"path": value, "keys": {name: key for name, (key, _) in settings.items()},
                                 "values": {name: setting for name, (_, setting) in settings.items()}}


RUN_CONFIG_KEYS = {"quantizer": "quantizers", "bits": "bits_list", "suite": "suites", "scorer": "scorers"}


def _setting_name(key: Any, known: set[str]) -> str:
    """The parameter name a run-config key sets: ``proxy-n`` → ``proxy_n``, ``quantizer`` → ``quantizers``."""
    plain = str(key).replace("-", "_")
    return RUN_CONFIG_KEYS.get(plain, plain) if RUN_CONFIG_KEYS.get(plain, plain) in known else plain


@contextlib.contextmanager
def naming_run_config(ctx: click.Context) -> Iterator[None]:
    """Errors raised while the settings are checked name the ``--config`` file and key when the bad value came
    from that file (e.g. ``quantizer: nosuch`` → ``... (run config run.yaml, key quantizer)``)."""
    try:
        yield
    except QbenchError as error:
        origin = _run_config_origin(ctx, str(error))
        if origin is None:
            raise
        raise QbenchError(f"{error} ({origin})") from None


def names_run_config(function: Callable) -> Callable:
    """Decorator for a command with ``--config``: its one-line errors name the run-config file and key of a bad
    value that came from the file (:func:`naming_run_config`)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with naming_run_config(click.get_current_context()):
            return function(*args, **kwargs)

    return wrapper


def _run_config_origin(ctx: click.Context, message: str) -> str | None:
    """``run config FILE, key KEY`` when a value the run config set (and the command line did not) is quoted
    in ``message``; None otherwise."""
    from click.core import ParameterSource

    run_config = ctx.meta.get(RUN_CONFIG_META)
    if run_config is None or run_config["path"] in message:
        return None
    for name, key in run_config["keys"].items():
        if name in ctx.params and ctx.get_parameter_source(name) is not ParameterSource.DEFAULT_MAP:
            continue
        quoted = {repr(str(item)) for item in _flat_values(run_config["values"][name])}
        if any(text in message for text in quoted):
            return f"run config {run_config['path']}, key {key}"
    return None


def _flat_values(value: Any) -> list[Any]:
    """Every scalar inside a YAML value (mapping keys and values, list items)."""
    if isinstance(value, dict):
        return [item for pair in value.items() for part in pair for item in _flat_values(part)]
    if isinstance(value, (list, tuple)):
        return [item for part in value for item in _flat_values(part)]
    return [value]


class WholeNumber(click.IntRange):
    """An integer option that refuses fractions and booleans: click's INT turns ``limit: 5.5`` of a YAML file
    into 5; this type makes it a one-line error. ``min``/``max`` bound it like :class:`click.IntRange`."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return super().convert(value, param, ctx)


SEED_MAX = 2**32 - 1
"""Largest seed (numpy's seed range); a bigger number is a one-line error instead of a torch overflow."""
SEED = WholeNumber(min=0, max=SEED_MAX)


def _run_config_defaults(raw: dict[str, Any], source: str, command: click.Command) -> dict[str, Any]:
    """YAML keys are the long option names (``proxy_n`` or ``proxy-n``); ``qparams``/``sparams``/``resources`` are
    mappings (``resources: {KEY: VALUE}`` is ``--resource KEY=VALUE``)."""
    params = command_params(command)
    known = {param.name for param in params}
    defaults: dict[str, Any] = {}
    for key, value in raw.items():
        name = _setting_name(key, known)
        if name in ("qparams", "qparam"):
            defaults["qparam"] = tuple(f"{k}={v}" for k, v in _mapping(value, key, source).items())
        elif name in ("sparams", "sparam"):
            defaults["sparam"] = tuple(f"{scorer}.{k}={v}" for scorer, scorer_params in _mapping(value, key, source).items()
                                       for k, v in _mapping(scorer_params, f"{key}.{scorer}", source).items())
        elif name == "resources" and "resource" in known:
            defaults["resource"] = tuple(f"{k}={v}" for k, v in _mapping(value, key, source).items())
        elif name in known and name != "config":
            multiple = next(param.multiple for param in params if param.name == name)
            if isinstance(value, list) and not multiple:
                raise QbenchError(f"run config {source}: {key} takes one value for 'qbench {command.name}', got a list")
            defaults[name] = tuple(value) if multiple and isinstance(value, list) else (value,) if multiple else value
        else:
            raise QbenchError(f"run config {source}: unknown setting {key!r} (use the long option names of 'qbench eval --help')")
    return defaults


def _mapping(value: Any, key: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise QbenchError(f"run config {source}: {key} must be a mapping, e.g. {{alpha: 0.5}}")
    return value


@cli.command("eval", cls=ResourceOptionsCommand)
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=_load_run_config,
              help="YAML file of settings (keys = long option names; qparams / sparams / resources as mappings); "
                   "flags override it.")
@click.option("--model", default=BuiltinDefault("model"), show_default=True, help="Model name (qbench list models).")
@click.option("--quantizer", "quantizers", multiple=True, default=BuiltinDefault("quantizer", many=True), show_default=True,
              help="Quantizer name, or family:ptq / family:qat for the built-ins of a family; repeat for a grid.")
@click.option("--suite", "suites", multiple=True, default=BuiltinDefault("suites"), show_default=True,
              help="Suite name; repeat for several.")
@click.option("--bits", "bits_list", multiple=True, help="Bit spec wXaY, e.g. w8a8, w6a8, w4a8; repeat for a grid (default: w8a8).")
@click.option("--scope", default="visual", show_default=True, help="visual (image tower) or joint (both towers).")
@click.option("--seed", multiple=True, default=(0,), show_default=True, type=SEED,
              help="Seed for calibration sampling and training; repeat for several (the grid runs every seed, "
                   "and the tables add mean ± std and significance over seeds).")
@click.option("--seeds", type=WholeNumber(min=1), default=None, help="Seeds 0..N-1 (shorthand for --seed 0 ... --seed N-1).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--qparam", multiple=True, help="Quantizer hyperparameter override NAME=VALUE (repeatable).")
@click.option("--proxy", default=BuiltinDefault("proxy"), show_default=True, help="Calibration image-caption source.")
@click.option("--proxy-n", default=1000, show_default=True, type=WholeNumber(), help="Number of proxy pairs.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help=f"Root folder of datasets (default ${DATA_ENV}).")
@click.option("--weights", type=click.Path(), default=None, help="Local checkpoint file or folder for the model.")
@click.option("--limit", type=WholeNumber(), default=None, help="Evaluate only the first N images of every dataset (quick look).")
@click.option("--logit-tuning", is_flag=True,
              help="Also report every metric with the quantized model's logit scale re-fit on the proxy pairs (backbone frozen).")
@click.option("--schedule", default=None,
              help="QAT training length for every QAT quantizer: light (100 steps), medium (900), long (8100) or a number of steps.")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(), default=None,
              help="Evaluate the quantized model saved by 'qbench quantize --out DIR' (no calibration or training).")
@click.option("--scorer", "scorers", multiple=True,
              help="OOD scorer to run (repeatable; default: every registered scorer, see qbench list scorers).")
@click.option("--sparam", multiple=True, help="Scorer hyperparameter SCORER.NAME=VALUE (repeatable; see qbench list scorers).")
@click.option("--resource", "resource", multiple=True, metavar="KEY=VALUE",
              help="A file or value a registered scorer reads, by its key (repeatable); the scorers' own options "
                   "below are shorthands for theirs.")
@click.option("--no-feature-cache", is_flag=True, help="Do not read or write the on-disk feature cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Feature cache folder (default $QBENCH_CACHE or ~/.cache/qbench/features).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
@click.option("--force", is_flag=True, help="Re-run even if the store has this configuration, recomputing cached features.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the summary table (one row per configuration) as markdown to this file.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None,
              help="Also write figures (PNG + CSV) and report.md for the evaluated run(s) to this folder (as 'qbench report').")
@click.option("--keep-quantized", is_flag=True,
              help="Keep the quantized model under the cache's quantized/ folder after the evaluation (it is always kept "
                   "until the result is stored, so a killed run resumes without calibrating or training again).")
@click.option("--qat-checkpoint-every", type=WholeNumber(min=1), default=50, show_default=True,
              help="QAT optimizer steps between step checkpoints (a killed QAT run resumes from the last one).")
@store_option
@weights_options
@batching_options
@threads_option
@names_run_config
def eval_command(model, quantizers, suites, bits_list, scope, seed, seeds, device, qparam, proxy, proxy_n, data_root,
                 weights, hf_cache, allow_download, random_init, batch_size, limit, logit_tuning, schedule, checkpoint_dir, scorers, sparam, resource,
                 no_feature_cache, cache_dir, as_json, force, markdown_path, store_path, workers, plots_dir, threads, keep_quantized,
                 qat_checkpoint_every, **scorer_resources) -> None:
    """Evaluate MODEL in FP32 and quantized with QUANTIZER on one or more suites.

    Several --quantizer, --bits and --seed values evaluate their grid, one stored evaluation per configuration;
    each finished configuration is in the store even if a later one fails. With two or more seeds the
    tables (and --json, as {"runs": [...], "seed_statistics": [...]}) add the statistics over seeds of
    scoring.md §2.7: mean ± std, standard error, t-interval, paired t-test and BH. With --checkpoint the
    quantized model (and its model, quantizer, bits, scope, seed and proxy) come from that folder.
    """
    network_policy(allow_download)
    from qbench.engine.evaluate import resolve
    from qbench.engine.execution import evaluate_once
    from qbench.engine.store import ResultStore
    from qbench.engine.threads import apply_threads

    markdown_target = check_output_file(markdown_path, "--markdown") if markdown_path else None
    if plots_dir:
        check_output_folder(plots_dir, "--plots")  # both checked before anything is computed
    if checkpoint_dir is not None:
        _refuse_with_checkpoint(click.get_current_context(), "--checkpoint")
    names = _expand_quantizers(quantizers or BuiltinDefault("quantizer", many=True)())
    if qparam and len(names) > 1:
        raise QbenchError("--qparam applies to one quantizer; evaluate one --quantizer at a time to override its parameters")
    params_for = _quantizer_params(names, _parse_qparams(qparam), schedule)
    seed_list = _eval_seeds(click.get_current_context(), seed, seeds)
    base = dataclasses.replace(
        eval_base_request(click.get_current_context().params), quantizer=names[0], quantizer_params=params_for[names[0]],
        bits=(bits_list or ("w8a8",))[0], seed=seed_list[0], threads=apply_threads(threads),
        refresh_cache=force,  # --force recomputes the cached features too, not only the stored result
    )
    grid = [dataclasses.replace(base, quantizer=name, bits=bits, quantizer_params=params_for[name], seed=run_seed)
            for name in names for bits in dict.fromkeys(bits_list or ("w8a8",)) for run_seed in seed_list]
    if checkpoint_dir is not None:
        grid = [base]
    resolved_grid = [resolve(request, registry()) for request in grid]  # every name and value checked first
    store = ResultStore(store_path)
    _print_set_aside(store)
    documents = []
    for position, resolved in enumerate(resolved_grid, start=1):
        if len(resolved_grid) > 1:
            stderr.print(f"[bold]{position}/{len(resolved_grid)}[/bold] {resolved.quantizer.name} {resolved.bits}"
                         + (f" seed {resolved.config['seed']}" if len(seed_list) > 1 else ""))
        outcome = evaluate_once(resolved, store, RichProgress(), force=force, keep_quantized=keep_quantized)
        if not outcome.computed:
            stderr.print(f"[dim]·[/dim] served from the store ({store.root}); use --force to re-run")
        elif outcome.saved is not None and not outcome.saved.indexed and outcome.saved.index_note:
            stderr.print(f"[yellow]note[/yellow]: {outcome.saved.describe()}", highlight=False, soft_wrap=True)
        documents.append(outcome.document)
    seed_rows = _seed_statistics(documents) if len(seed_list) > 1 else None
    if as_json:
        several = {"runs": documents, **({"seed_statistics": seed_rows} if seed_rows is not None else {})}
        click.echo(json.dumps(documents[0] if len(documents) == 1 else several))
        for document in documents:  # stdout is the JSON: the counts go to the console on stderr
            for line in unreadable_lines(document):
                stderr.print(f"[yellow]skipped[/yellow] {line} (config {document['config']['config_hash']})",
                             highlight=False, soft_wrap=True)
    elif len(documents) == 1:
        print_document(documents[0])
    else:
        stdout_console().print(_summary_table(documents))
        for document in documents:
            for line in unreadable_lines(document):
                stdout_console().print(f"[yellow]skipped[/yellow] {line} (config {document['config']['config_hash']})",
                                       highlight=False)
        if seed_rows:
            _print_seed_table(seed_rows)
    hashes = ", ".join(document["config"]["config_hash"] for document in documents)
    stored = f"the evaluations are in the store {store.root} (config {hashes})"
    if markdown_target is not None:
        write_output_or_fail(markdown_target, summary_markdown(documents) + _seed_markdown(seed_rows), "--markdown",
                             f"{stored}; re-run the same command with another --markdown path (served from the store)")
        stderr.print(f"wrote the summary table to {markdown_target}", highlight=False)
    if plots_dir:
        write_report_or_fail(documents, plots_dir, f"{stored}; retry with 'qbench report HASH_OR_QUERY --out {plots_dir}'")


@cli.command("quantize")
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=_load_run_config,
              help="YAML file of settings (keys = long option names; qparams as a mapping); flags override it.")
@click.option("--model", default=BuiltinDefault("model"), show_default=True, help="Model name (qbench list models).")
@click.option("--quantizer", default=BuiltinDefault("quantizer"), show_default=True, help="Quantizer name (qbench list quantizers).")
@click.option("--bits", default="w8a8", show_default=True, help="Bit spec wXaY, e.g. w8a8, w4a8.")
@click.option("--scope", default="visual", show_default=True, help="visual (image tower) or joint (both towers).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for calibration sampling and training.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (where calibration and training run).")
@click.option("--qparam", multiple=True, help="Quantizer hyperparameter override NAME=VALUE (repeatable).")
@click.option("--schedule", default=None,
              help="QAT training length: light (100 steps), medium (900), long (8100) or a number of steps.")
@click.option("--proxy", default=BuiltinDefault("proxy"), show_default=True, help="Calibration image-caption source.")
@click.option("--proxy-n", default=1000, show_default=True, type=WholeNumber(), help="Number of proxy pairs.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help=f"Root folder of datasets and proxies (default ${DATA_ENV}).")
@click.option("--weights", type=click.Path(), default=None, help="Local checkpoint file or folder for the float model.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Folder to write the quantized checkpoint to.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the checkpoint's description (without its structure) as JSON.")
@weights_options
@batching_options
@threads_option
@names_run_config
def quantize_command(model, quantizer, bits, scope, seed, device, qparam, schedule, proxy, proxy_n, data_root, weights,
                     out_dir, force, as_json, hf_cache, allow_download, random_init, batch_size, workers, threads) -> None:
    """Quantize MODEL once (calibration and, for QAT, training) and save the quantized model to --out.

    The folder holds model.safetensors (every weight, quantizer parameter and adapter) and
    qbench-checkpoint.json (configuration and its hash, provenance, verification, structure);
    'qbench eval --checkpoint DIR' evaluates it without calibrating or training again.
    """
    network_policy(allow_download)
    from qbench.engine.evaluate import EvalRequest, quantize_to_checkpoint, resolve
    from qbench.data import resolve_data_root
    from qbench.engine.threads import apply_threads

    check_output_folder(out_dir, "--out")  # before calibrating or training: a file in the way is one line
    if weights is not None and not Path(weights).expanduser().exists():
        raise QbenchError(f"checkpoint path {weights} does not exist; pass --weights a checkpoint file or folder")
    params = _quantizer_params([quantizer], _parse_qparams(qparam), schedule)[quantizer]
    request = EvalRequest(model=model, quantizer=quantizer, quantizer_params=params, bits=bits, scope=scope, seed=seed,
                          device=device, proxy=proxy, proxy_n=proxy_n, data_root=resolve_data_root(data_root),
                          weights=weights, suites=(), hf_cache=hf_cache, allow_download=allow_download,
                          random_init=random_init, batch_size=batch_size, workers=workers, threads=apply_threads(threads))
    resolved = resolve(request, registry(), require_suites=False)
    verification_proxy = registry().get("proxies", proxy)
    checkpoint, verification = quantize_to_checkpoint(resolved, verification_proxy, out_dir, RichProgress(), overwrite=force)
    if as_json:
        click.echo(json.dumps({key: value for key, value in checkpoint.document.items() if key != "structure"}, default=str))
        return
    status = "[green]passed[/green]" if verification["passed"] else "[red]FAILED[/red]"
    stderr.print(f"verification (at most 2^b distinct values per quantized tensor, on proxy pairs): {status}, "
                 f"{verification['n_modules']} quantized modules")
    for problem in verification.get("problems", []):
        stderr.print(f"  [red]problem:[/red] {problem}", highlight=False)
    stderr.print(f"wrote {checkpoint.path} (config {checkpoint.config_hash}, {checkpoint.document['state']['tensors']} tensors); "
                 f"evaluate it with: qbench eval --checkpoint {checkpoint.path} --suite SUITE", highlight=False)


CHECKPOINT_FIXED = ("model", "quantizers", "bits_list", "scope", "seed", "seeds", "qparam", "proxy", "proxy_n", "schedule")


def eval_base_request(options: dict[str, Any]):
    """The :class:`~qbench.engine.evaluate.EvalRequest` of ``qbench eval`` option values (``ctx.params``) that every
    configuration of a grid shares: model, suites, scope, data, weights, scorers, caches. Quantizer, bits and
    seed are left at their defaults for the caller to vary. Used by ``qbench eval`` and by sweep files, so both
    read settings the same way."""
    from qbench.data import resolve_data_root
    from qbench.engine.evaluate import EvalRequest

    option = options.get
    weights = option("weights")
    if weights is not None and not Path(weights).expanduser().exists():
        raise QbenchError(f"checkpoint path {weights} does not exist; pass --weights a checkpoint file or folder")
    return EvalRequest(
        model=option("model") or BuiltinDefault("model")(), scope=option("scope", "visual"),
        suites=tuple(option("suites") or ()) or BuiltinDefault("suites")(),
        device=option("device", "cpu"), proxy=option("proxy") or BuiltinDefault("proxy")(), proxy_n=option("proxy_n", 1000),
        data_root=resolve_data_root(option("data_root")), weights=weights, batch_size=option("batch_size"),
        workers=option("workers"), hf_cache=option("hf_cache"), allow_download=bool(option("allow_download")),
        random_init=bool(option("random_init")), scorers=tuple(dict.fromkeys(option("scorers") or ())),
        scorer_params=_parse_sparams(option("sparam") or ()),
        resources=eval_scorer_resources(options),
        feature_cache=not option("no_feature_cache"), cache_dir=option("cache_dir"), limit=option("limit"),
        logit_tuning=bool(option("logit_tuning")), checkpoint=option("checkpoint_dir"),
        qat_checkpoint_every=option("qat_checkpoint_every", 50),
    )


def eval_scorer_resources(options: dict[str, Any]):
    """The :class:`~qbench.scoring.ScorerResources` of ``qbench eval`` option values: each scorer's own options
    (by resource key) and ``--resource KEY=VALUE``, checked against what the registered scorers declare.
    The registry is built only when a resource was given."""
    from qbench.scoring import ScorerResources, parse_resources

    assignments = tuple(options.get("resource") or ())
    core = {param.name for param in eval_command.params}
    named = {key: value for key, value in options.items() if value is not None and key not in core}
    if not assignments and not named:
        return ScorerResources()
    declared = declared_scorer_resources()
    return parse_resources(declared, {key: value for key, value in named.items() if key in declared}, assignments)


def eval_options_from_settings(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """``qbench eval`` option values (as click parses them: types, ``auto`` values, checks) for a mapping of
    settings written as in a run config (long option names), with every other option at its default."""
    defaults = _run_config_defaults(settings, source, eval_command)
    try:
        with eval_command.make_context("eval", [], default_map=defaults, resilient_parsing=False) as ctx:
            return dict(ctx.params)
    except click.ClickException as error:  # a value of the wrong type: one line, like every user error
        raise QbenchError(f"run config {source}: {error.format_message()}") from None


def _refuse_with_checkpoint(ctx: click.Context, flag: str) -> None:
    """One-line error when a setting the checkpoint fixes was also given on the command line or in --config."""
    from click.core import ParameterSource

    given = [name for name in CHECKPOINT_FIXED
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.DEFAULT_MAP)]
    if given:
        option = next(param.opts[0] for param in ctx.command.params if param.name == given[0])
        where = "the run config" if ctx.get_parameter_source(given[0]) is ParameterSource.DEFAULT_MAP else "the command line"
        raise QbenchError(f"{flag} fixes the model, quantizer, bits, scope, seed and proxy it was made with; "
                          f"drop {option} from {where}")


def _quantizer_params(names: Sequence[str], qparams: tuple[tuple[str, str], ...],
                      schedule: str | None) -> dict[str, tuple[tuple[str, str], ...]]:
    """Each quantizer's overrides: ``--qparam`` pairs, plus ``steps`` from ``--schedule`` for the QAT ones."""
    params = {name: tuple(qparams) for name in names}
    if schedule is None:
        return params
    from qbench.quant.qat import schedule_steps

    steps = schedule_steps(schedule)
    trained = [name for name in names if registry().get("quantizers", name).family == "qat"]
    if not trained:
        raise QbenchError(f"--schedule sets the training length of QAT quantizers, and none of {', '.join(names)} is one "
                          "(see 'qbench list quantizers', family qat)")
    if any(key == "steps" for key, _ in qparams):
        raise QbenchError("--schedule and --qparam steps=... both set the training length; give one of them")
    for name in trained:
        params[name] = params[name] + (("steps", str(steps)),)
    return params


def _expand_quantizers(values: Sequence[str]) -> list[str]:
    """Quantizer names in order; ``family:NAME`` expands to the built-in quantizers of that family
    (:func:`qbench.engine.sweep.expand_quantizer`: installing a plugin does not change what a command runs)."""
    from qbench.engine.sweep import expand_quantizer

    names: list[str] = []
    for value in values:
        names.extend(expand_quantizer(value, registry()) if value.startswith("family:") else [value])
    return list(dict.fromkeys(names))


def summary_rows(documents: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per (configuration, zero-shot dataset, tuned or not): accuracy, ECE and NLL as ``fp32 → quantized``.

    A ``tuned`` column appears when any configuration was run with ``--logit-tuning``. Runs without zero-shot
    tasks (robustness, spurious, spectral suites) get one row per configuration of :func:`beyond_accuracy_rows`.
    """
    rows = zero_shot_rows(documents)
    return rows if rows else beyond_accuracy_rows(documents)


# (column, task, metric, param, dataset or None, how the cell is drawn: "pair", "value" or "delta")
BEYOND_ACCURACY_COLUMNS: tuple[tuple[str, str, str, str | None, str | None, str], ...] = (
    ("clean acc", "robustness", "accuracy", None, "clean", "pair"),
    ("shifted acc", "robustness", "accuracy", None, "shifted-mean", "pair"),
    ("δ shifted", "robustness", "accuracy", None, "shifted-mean", "delta"),
    ("RSG", "spurious", "rsg", None, None, "pair"),
    ("ΔRSG", "spurious", "delta_rsg", None, None, "value"),
    ("V_add", "spurious", "v_add", None, None, "value"),
    ("SQNR dB", "spectral", "sqnr_db", "ranks=all", None, "value"),
    ("k_sat", "spectral", "k_sat", "theta=0.95", None, "value"),
    ("RSE", "spectral", "rse", "band=all", None, "value"),
    ("dropout δ p=0.10", "dropout", "dropout_delta", "p=0.10", None, "value"),
)
"""Headline columns of the summary table for runs without zero-shot tasks (first matching record of each)."""


def beyond_accuracy_rows(documents: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per configuration: shifted accuracy and δ, RSG/ΔRSG/V_add, SQNR, k_sat, RSE, dropout δ.

    Only columns some run measured appear; the first (untuned) record of each kind is shown.
    """
    cells = [(document, {column[0]: _headline(document, *column[1:]) for column in BEYOND_ACCURACY_COLUMNS})
             for document in documents]
    present = [column[0] for column in BEYOND_ACCURACY_COLUMNS if any(found[column[0]] is not None for _, found in cells)]
    if not present:
        return []
    several_seeds = has_several_seeds(documents)
    rows = []
    for document, found in cells:
        row = row_identity(document, several_seeds)
        row.update({column: found[column] or "-" for column in present})
        rows.append(add_row_audit(row, document, documents))
    return rows


def has_several_seeds(documents: Sequence[dict[str, Any]]) -> bool:
    """Whether the documents span seeds (summary tables then add a ``seed`` column)."""
    return len({document["config"].get("seed") for document in documents}) > 1


def row_identity(document: dict[str, Any], several_seeds: bool) -> dict[str, str]:
    """The leading cells of a summary row: quantizer, bits, scope (and seed when the table spans seeds)."""
    config = document["config"]
    return {"quantizer": config["quantizer"], "bits": config["bits"], "scope": config["scope"],
            **({"seed": str(config.get("seed"))} if several_seeds else {})}


def add_row_audit(row: dict[str, str], document: dict[str, Any], documents: Sequence[dict[str, Any]]) -> dict[str, str]:
    """``row`` with its trailing cells: images (for ``--limit`` runs), verified, config hash."""
    config = document["config"]
    if any_partial(documents):
        row["images"] = images_label(config.get("limit"))
    row["verified"] = "yes" if document["verification"]["passed"] else "NO"
    row["config"] = config["config_hash"]
    return row


def _headline(document: dict[str, Any], task: str, metric: str, param: str | None, dataset: str | None,
              style: str) -> str | None:
    """The cell of one headline column, or None when the run has no such record."""
    for record in document["results"]:
        if (record.get("task") != task or record["metric"] != metric or record.get("scorer") or record.get("logit_tuned")
                or (param is not None and record.get("param") != param)):
            continue
        if not _dataset_matches(record, dataset):
            continue
        if style == "pair":
            return f"{_fmt(record['fp32'], metric)} → {_fmt(record['quantized'], metric)}"
        if style == "delta":
            return "-" if record["delta"] is None else f"{100 * record['delta']:+.2f}%"
        value = record.get("value")
        if value is None:
            return "∞" if metric == "sqnr_db" else "-"
        if metric == "k_sat":
            return str(int(value))
        return f"{value:.2f}" if metric == "sqnr_db" else f"{value:.3g}" if metric == "rse" else _fmt(value, metric)
    return None


def _dataset_matches(record: dict[str, Any], dataset: str | None) -> bool:
    """``None``: any dataset; ``"clean"``: a robustness task's clean split; otherwise that dataset name."""
    if dataset is None:
        return True
    if dataset == "clean":
        return record.get("role") == "clean"
    return record["dataset"] == dataset


def any_partial(documents: Sequence[dict[str, Any]]) -> bool:
    """Whether any document is a ``--limit`` run (summary tables then add an ``images`` column)."""
    return any(document["config"].get("limit") is not None for document in documents)


def zero_shot_rows(documents: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The zero-shot rows of :func:`summary_rows`."""
    any_tuned = any(record.get("logit_tuned") for document in documents for record in document["results"])
    several_seeds = has_several_seeds(documents)
    rows = []
    for document in documents:
        by_dataset: dict[tuple[str, bool], dict[str, dict[str, Any]]] = {}
        for record in document["results"]:
            if record.get("task", "zeroshot") == "zeroshot":
                key = (record["dataset"], bool(record.get("logit_tuned")))
                by_dataset.setdefault(key, {})[record["metric"]] = record
        for (dataset, tuned), records in by_dataset.items():
            row = {**row_identity(document, several_seeds), "dataset": dataset}
            if any_tuned:
                row["tuned"] = "yes" if tuned else "no"
            for metric in ("accuracy", "ece", "nll"):
                record = records.get(metric)
                row[metric] = "-" if record is None else f"{_fmt(record['fp32'], metric)} → {_fmt(record['quantized'], metric)}"
            rows.append(add_row_audit(row, document, documents))
    return rows


def _summary_table(documents: Sequence[dict[str, Any]]) -> Table:
    rows = summary_rows(documents)
    table = Table(show_lines=False)
    for column in (rows[0] if rows else {"quantizer": ""}):
        table.add_column(column, justify="left" if column in ("quantizer", "bits", "scope", "dataset", "config") else "right")
    for row in rows:
        table.add_row(*row.values())
    return table


def summary_markdown(documents: Sequence[dict[str, Any]]) -> str:
    """The summary table as GitHub markdown, for READMEs and reports."""
    rows = summary_rows(documents)
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[column] for column in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _eval_seeds(ctx: click.Context, seed: tuple[int, ...], seeds: int | None) -> tuple[int, ...]:
    """The seeds to run, in order and without repeats: ``--seed`` values, or ``0..N-1`` from ``--seeds N``.

    ``--seed`` and ``--seeds`` at the same level (both on the command line, or both in the run config)
    are a one-line error; otherwise the command line wins over the run config.
    """
    from click.core import ParameterSource

    if seeds is not None:
        seed_source, seeds_source = ctx.get_parameter_source("seed"), ctx.get_parameter_source("seeds")
        if seed_source is seeds_source:
            where = "in the run config" if seeds_source is ParameterSource.DEFAULT_MAP else "on the command line"
            raise QbenchError(f"--seed and --seeds both choose the seeds ({where}); give one of them")
        if seed_source is not ParameterSource.COMMANDLINE:
            seed = tuple(range(seeds))
    chosen = tuple(dict.fromkeys(seed))
    if len(seed) > 1 and len(chosen) == 1:
        stderr.print(f"[yellow]note[/yellow]: --seed names one seed ({chosen[0]}) {len(seed)} times; "
                     "no statistics over seeds (they need two or more seeds)", highlight=False)
    return chosen


def _seed_statistics(documents: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`qbench.analysis.seed_stats.seed_statistics` of the grid, with a note for a configuration left at one seed."""
    from qbench.analysis.seed_stats import seed_groups, seed_statistics

    for group in seed_groups(documents):
        if len(group.seeds) < 2:
            stderr.print(f"[yellow]note[/yellow]: {group.description} ran at one seed only ({group.seeds[0]}); "
                         "no statistics over seeds for it", highlight=False)
    return seed_statistics(documents)


def _seed_markdown(rows: Sequence[dict[str, Any]] | None) -> str:
    """The seed table for ``--markdown`` (after the summary table), or nothing with a single seed."""
    from qbench.analysis.seed_stats import seed_statistics_markdown

    return "\n" + seed_statistics_markdown(rows) if rows else ""


def _print_seed_table(rows: Sequence[dict[str, Any]]) -> None:
    """The statistics over seeds as a rich table; the caption says "±" is a seed std (scoring.md §2.7)."""
    from qbench.analysis.seed_stats import SEED_TABLE_CAPTION, seed_notes, seed_table_cells

    cells = seed_table_cells(rows)
    table = Table(show_lines=False, title="statistics over seeds", caption=SEED_TABLE_CAPTION)
    numeric = ("seeds", "fp32 mean ± std", "quantized mean ± std", "Δ (or value) mean ± std", "p", "p (Wilcoxon)", "p (BH)")
    for column in cells[0]:
        table.add_column(column, justify="right" if column in numeric else "left")
    for cell in cells:
        table.add_row(*cell.values())
    console = stdout_console()
    console.print(table)
    for note in seed_notes(rows):
        console.print(f"[dim]note: {note}[/dim]", highlight=False)


POINT_DIFFERENCE_METRICS = ("delta_rsg", "v_add")
"""Differences of two fractions (RSG(q) − RSG(fp), δ_C − δ_N): shown in percentage points, signed."""


def _fmt(value: float | None, metric: str) -> str:
    from qbench.analysis.metrics import PERCENT_METRICS

    if value is None:
        return "-"
    if metric in POINT_DIFFERENCE_METRICS:
        return f"{100 * value:+.2f} pp"
    return f"{100 * value:.2f}%" if metric in PERCENT_METRICS else f"{value:.4f}"


def print_document(document: dict[str, Any]) -> None:
    """The human view of an evaluation: configuration line, verification, metric table."""
    console = stdout_console()
    config = document["config"]
    console.print(
        f"[bold]{config['model']}[/bold] · {config['quantizer']} {config['bits']} ({config['scope']} scope) "
        f"· seed {config['seed']} · config {config['config_hash']}"
    )
    if config.get("limit") is not None:
        console.print(f"[yellow]PARTIAL RUN[/yellow]: {partial_note(config['limit'])}", highlight=False)
    for line in unreadable_lines(document):
        console.print(f"[yellow]skipped[/yellow] {line}", highlight=False)
    verification = document["verification"]
    status = "[green]passed[/green]" if verification["passed"] else "[red]FAILED[/red]"
    console.print(f"verification (at most 2^b distinct values per quantized tensor): {status}, "
                  f"{verification['n_modules']} quantized modules")
    for problem in verification.get("problems", []):
        console.print(f"  [red]problem:[/red] {problem}")
    tuning = document.get("logit_tuning")
    if tuning:
        console.print(f"logit tuning on {tuning['proxy_n']} proxy pairs: s {tuning['s_before']:.4g} → {tuning['s_after']:.4g} "
                      f"(proxy loss {tuning['loss_before']:.4f} → {tuning['loss_after']:.4f}); "
                      "tuned rows use the re-fit scale for the quantized column, fp32 stays untuned")
    paired = [record for record in document["results"] if not record.get("scorer") and record.get("fp32") is not None]
    single = [record for record in document["results"] if not record.get("scorer") and record.get("fp32") is None]
    ood = [record for record in document["results"] if record.get("scorer")]
    if paired:
        console.print(_zero_shot_table(paired))
        console.print(f"[dim]{CHANGE_NOTE}[/dim]")
    if single:
        console.print(_value_table(single))
    if ood:
        console.print(_ood_table(ood))
        console.print("[dim]OOD: higher score = more in-distribution; FPR@95 with ID as positive (TPR measured on ID)[/dim]")
        for scorer, note in _scorer_notes(document):
            console.print(f"[dim]{scorer}: {note}[/dim]", highlight=False)
    for skipped in document.get("skipped", []):
        console.print(f"[yellow]skipped[/yellow] {skipped['scorer']} on {skipped['suite']}/{skipped['ood_dataset']}: "
                      f"{skipped['reason']}", markup=True, highlight=False)


def partial_note(limit: int) -> str:
    """What a ``--limit`` run is, for the console, tables and reports."""
    return (f"--limit {limit}: only the first {limit} images of each dataset; the numbers are not comparable with "
            "a full run (and the leaderboard refuses it)")


def unreadable_lines(document: dict[str, Any]) -> list[str]:
    """One line per dataset with unreadable images that were skipped (the document's ``datasets`` section)."""
    lines = []
    for name, info in (document.get("datasets") or {}).items():
        count = info.get("unreadable") or 0
        if count:
            examples = ", ".join(str(path) for path in (info.get("unreadable_examples") or [])[:2])
            scored = info.get("num_scored")
            lines.append(f"{count} unreadable image(s) of {name}" + (f" (e.g. {examples})" if examples else "")
                         + (f"; its metrics use the {scored} readable ones" if scored is not None else ""))
    return lines


CHANGE_NOTE = ("Δ = quantized − fp32, as in the leaderboard (pp for % metrics); Δ/fp32 relative; "
               "--json: diff = Δ, delta = −Δ/fp32")
"""The caption under the paired-metric table: which way the change columns point."""


def signed_change(value: float | None, metric: str) -> str:
    """A signed difference as the leaderboard writes it: pp for % metrics, ``±0.00`` when it rounds to zero."""
    from qbench.analysis.metrics import PERCENT_METRICS

    if value is None:
        return "-"
    text = f"{100 * value:+.2f}" if metric in PERCENT_METRICS else f"{value:+.4f}"
    text = "±" + text[1:] if float(text) == 0 else text
    return f"{text} pp" if metric in PERCENT_METRICS else text


def relative_change(fp32: float | None, quantized: float | None) -> str:
    """``(quantized − fp32) / fp32`` in percent, signed like Δ; ``-`` when undefined."""
    if fp32 is None or quantized is None or fp32 == 0:
        return "-"
    text = f"{100 * (quantized - fp32) / fp32:+.2f}"
    return ("±" + text[1:] if float(text) == 0 else text) + "%"


def _scorer_notes(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Where each scorer's words and labels came from, so offline substitutes are named on screen too."""
    notes = []
    for scorer, info in document.get("scorers", {}).items():
        for plan in info.get("plans", {}).values():
            for key in ("lexicon_note", "source"):
                if plan.get(key):
                    notes.append((scorer, str(plan[key])))
    return list(dict.fromkeys(notes))


def _zero_shot_table(records: list[dict[str, Any]]) -> Table:
    """One row per paired record (zero-shot, robustness, spurious, spectral accuracies): FP32, quantized, and the
    change Δ = quantized − fp32 (the leaderboard's sign) absolute and relative; ``task`` and ``param`` columns
    appear when any record has them, ``tuned`` with logit tuning."""
    any_tuned = any(record.get("logit_tuned") for record in records)
    any_task = any(record.get("task", "zeroshot") != "zeroshot" for record in records)
    any_param = any(record.get("param") for record in records)
    table = Table(show_lines=False)
    numbers = ("fp32", "quantized", "Δ = q − fp32", "Δ/fp32")
    columns = ("suite", *(("task",) if any_task else ()), "dataset", "metric", *(("param",) if any_param else ()),
               *(("tuned",) if any_tuned else ()), *numbers)
    for column in columns:
        table.add_column(column, justify="right" if column in numbers else "left")
    for record in records:
        fp32, quantized, metric = record["fp32"], record["quantized"], record["metric"]
        diff = record.get("diff", None if fp32 is None or quantized is None else quantized - fp32)
        task = (record.get("task", "zeroshot"),) if any_task else ()
        param = (record.get("param") or "",) if any_param else ()
        tuned = ("yes" if record.get("logit_tuned") else "no",) if any_tuned else ()
        table.add_row(record["suite"], *task, record["dataset"], metric, *param, *tuned,
                      _fmt(fp32, metric), _fmt(quantized, metric), signed_change(diff, metric),
                      relative_change(fp32, quantized))
    return table


def _value_table(records: list[dict[str, Any]]) -> Table:
    """Single-value records (ΔRSG, V_add, SQNR, Sim_k, RSE, dropout, ...): one comparison number each."""
    any_tuned = any(record.get("logit_tuned") for record in records)
    table = Table(show_lines=False)
    for column in ("suite", "task", "dataset", "metric", "param", *(("tuned",) if any_tuned else ()), "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for record in records:
        tuned = ("yes" if record.get("logit_tuned") else "no",) if any_tuned else ()
        table.add_row(record["suite"], record.get("task", ""), record["dataset"], record["metric"], record.get("param") or "",
                      *tuned, _fmt(record.get("value"), record["metric"]))
    return table


def _ood_table(records: list[dict[str, Any]]) -> Table:
    """One row per (suite, pair, scorer); one ``fp32 → quantized`` cell per OOD metric (percent)."""
    metric_names = list(dict.fromkeys(record["metric"] for record in records))
    rows: dict[tuple, dict[str, str]] = {}
    for record in records:
        scorer = f"{record['scorer']} (tuned)" if record.get("logit_tuned") else record["scorer"]
        key = (record["suite"], f"{record['id_dataset']} vs {record['ood_dataset']} ({record['ood_kind']})", scorer)
        rows.setdefault(key, {})[record["metric"]] = f"{100 * record['fp32']:.2f} → {100 * record['quantized']:.2f}"
    table = Table(show_lines=False)
    for column in ("suite", "pair", "scorer"):
        table.add_column(column)
    for metric in metric_names:
        table.add_column(f"{metric} % (fp32 → q)", justify="right")
    for (suite, pair, scorer), cells in rows.items():
        table.add_row(suite, pair, scorer, *(cells.get(metric, "-") for metric in metric_names))
    return table


# -- results -------------------------------------------------------------------------------------
@cli.command("results")
@store_option
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write all result records as CSV.")
@click.option("--reindex", is_flag=True, help="Rebuild the SQLite index from the result files (after cluster jobs wrote "
                                              "files only, or when the index was locked or lost).")
def results_command(store_path, csv_path, reindex) -> None:
    """List stored evaluations, export every result record to CSV, or rebuild the index from the files."""
    from qbench.engine.store import ResultStore

    csv_target = check_output_file(csv_path, "--csv") if csv_path else None
    store = ResultStore(store_path)
    if reindex:
        report = store.reindex()
        if report.error:
            raise QbenchError(f"cannot rebuild the index: {report.error}; the result files under {store.documents_dir} "
                              "are unchanged")
        stderr.print(f"index {store.index_path}: {report.added} added, {report.updated} re-read, {report.removed} removed"
                     + (f"; {len(report.corrupt)} corrupt file(s) left out, e.g. {report.corrupt[0]}" if report.corrupt else ""),
                     highlight=False)
        return
    if csv_target is not None:
        try:
            rows = store.export_csv(csv_target)
        except OSError as error:
            raise QbenchError(f"cannot write --csv {csv_target} ({error.strerror or error}); choose another path") from None
        stderr.print(f"wrote {rows} result records to {csv_target}", highlight=False)
        return
    report = store.sync_index()
    table = Table(title=f"evaluations in {store.root}", title_justify="left")
    for column in ("config hash", "created", "model", "quantizer", "bits", "scope", "suites", "images", "verified"):
        table.add_column(column)
    corrupt = list(report.corrupt)
    for row in _stored_rows(store, report.error, corrupt):
        table.add_row(*row)
    stdout_console().print(table)
    left_out = [f"{path} (left in place)" for path in corrupt]
    left_out += [f"a row of {store.path} (moved to {path})" for path in store.set_aside]
    if left_out:  # listed what could be read; the exit status says the store is not whole
        more = f" and {len(left_out) - 1} more" if len(left_out) > 1 else ""
        raise QbenchError(f"{len(left_out)} stored result(s) are corrupt and not listed: {left_out[0]}{more}; re-run their "
                          "configurations to replace them (or delete the files)")


def images_label(limit: Any) -> str:
    """``all`` for a full run; ``first N (partial)`` for a ``--limit N`` run, which is not comparable with full runs."""
    return "all" if limit is None else f"first {limit} (partial)"


def _stored_rows(store: Any, index_error: str | None, corrupt: list[str]) -> list[tuple[str, ...]]:
    """The rows of ``qbench results``: from the index, or, when it is unusable, from the files themselves (a note
    says why; corrupt files are appended to ``corrupt``)."""
    import sqlite3

    from qbench.engine.store import suites_label

    if index_error is None:
        try:
            return [(row.config_hash, row.created_at, row.model, row.quantizer, row.bits, row.scope, row.suites,
                     images_label(row.limit), "yes" if row.verified else "NO") for row in store.index_rows()]
        except sqlite3.Error as error:
            index_error = f"{store.index_path}: {error}"
    if store.index_path is not None:
        stderr.print(f"[yellow]note[/yellow]: the index is unusable ({index_error}); listing the result files "
                     f"instead: move {store.index_path} aside and run 'qbench results --reindex'", highlight=False,
                     soft_wrap=True)
    rows = []
    for document in store.documents(on_corrupt=lambda problem: corrupt.append(str(problem.path))):
        config = document["config"]
        rows.append((config["config_hash"], str(document.get("provenance", {}).get("created_at", "")), config["model"],
                     config["quantizer"], config["bits"], config["scope"], suites_label(config),
                     images_label(config.get("limit")), "yes" if document["verification"]["passed"] else "NO"))
    return rows


def _print_set_aside(store: Any) -> None:
    """One line per corrupt row of an earlier store's table that opening the store moved to ``corrupt/``."""
    for path in getattr(store, "set_aside", []):
        stderr.print(f"[yellow]corrupt[/yellow] a row of the earlier store {store.path} is not a result document; "
                     f"moved to {path} (re-run its configuration to replace it)", highlight=False, soft_wrap=True)


# -- output paths --------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent folder (or file in the way)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_file(value: str, option: str) -> Path:
    """The file ``option`` names, checked before anything is computed: its folder exists (and is a folder), it is
    not itself a folder, and it can be written. Problems are one line naming the fix."""
    target = Path(value).expanduser()
    if target.is_dir():
        raise QbenchError(f"{option} {value} is a folder; give a file path, e.g. {option} {target / 'results.csv'}")
    folder = target.parent
    found = _existing_ancestor(folder)
    if not found.is_dir():
        raise QbenchError(f"{option} {value}: {found} is a file, not a folder; choose another path for {option}")
    if found != folder:
        raise QbenchError(f"{option} {value}: the folder {folder} does not exist; create it (mkdir -p {folder}) "
                          f"or choose another path for {option}")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise QbenchError(f"{option} {value}: {target if target.exists() else folder} is not writable; "
                          f"choose another path for {option}")
    return target


def check_output_folder(value: str, option: str) -> Path:
    """The folder ``option`` names (created later if missing), checked before anything is computed: no file is in
    its place or among its parents, and the nearest existing folder can be written. Problems are one line."""
    target = Path(value).expanduser()
    found = _existing_ancestor(target)
    if not found.is_dir():
        what = "is a file" if found == target else f"cannot be created: {found} is a file"
        raise QbenchError(f"{option} {value} {what}, not a folder; choose another folder for {option}")
    if not os.access(found, os.W_OK):
        raise QbenchError(f"{option} {value}: {found} is not writable; choose another folder for {option}")
    return target


def write_output_or_fail(target: Path, text: str, option: str, hint: str) -> None:
    """Write an output file atomically (:func:`qbench.atomic.write_output`); a failure is one line with ``hint``
    (where the computed results are)."""
    from qbench.atomic import write_output

    try:
        write_output(target, text)
    except OSError as error:
        raise QbenchError(f"cannot write {option} {target} ({error.strerror or error}); {hint}") from None


# -- report --------------------------------------------------------------------------------------
def write_report_or_fail(documents: Sequence[dict[str, Any]], out_dir: str, hint: str = "",
                         deploy_checks: Sequence[dict[str, Any]] = ()) -> Path:
    """``report.md`` and its figures in ``out_dir``; any failure is one line (the evaluations are already stored)."""
    from qbench.reporting.report import report_figures, write_report

    try:
        path = write_report(list(documents), Path(out_dir).expanduser(), deploy_checks=list(deploy_checks))
    except QbenchError:
        raise
    except Exception as error:  # a drawing or file error must not end in a traceback
        detail = (str(error).splitlines() or [""])[0]
        raise QbenchError(f"cannot write the report to {out_dir} ({type(error).__name__}: {detail})"
                          + (f"; {hint}" if hint else "")) from None
    stderr.print(f"wrote {path} with {len(report_figures(path.parent))} figures (PNG + CSV)", highlight=False)
    return path


@cli.command("report")
@click.argument("run_or_query")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for report.md, the PNG figures and their CSV data.")
@store_option
def report_command(run_or_query, out_dir, store_path) -> None:
    """Figures (PNG + CSV) and a markdown page for RUN_OR_QUERY.

    RUN_OR_QUERY is a JSON file ('qbench eval --json' output, {"runs": [...]} or a leaderboard
    submission), a stored config hash or unique prefix, or a query key=value[,key=value...] over
    model, quantizer, bits, scope, seed and suite (e.g. quantizer=NAME,bits=w4a8). A 'qbench deploy-check'
    record (its --json output or its stored hash) gives its simulated-vs-real section; evaluations of a
    checkpoint come with the stored deploy checks of that checkpoint.
    """
    from qbench.reporting.report import select_report

    documents, deploy_checks = select_report(run_or_query, store_path)
    write_report_or_fail(documents, out_dir, deploy_checks=deploy_checks)


# -- deploy check ----------------------------------------------------------------------------------
@cli.command("deploy-check")
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(),
              help="A quantized checkpoint written by 'qbench quantize --out DIR'.")
@click.option("--suite", "suites", multiple=True, required=True, help="Suite name; repeat for several.")
@click.option("--engine", default="torchao", show_default=True, type=click.Choice(["torchao", "onnxruntime"]),
              help="Integer engine (needs the extra: pip install 'qbench[deploy]').")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--limit", type=WholeNumber(), default=None, help="Only the first N images of every dataset (quick look).")
@click.option("--no-compile", is_flag=True, help="Run the engine eagerly (torchao: no torch.compile; slower, same integers).")
@click.option("--repeats", type=WholeNumber(min=1), default=5, show_default=True,
              help="Repetitions of the interleaved timing run (ratios of medians).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help=f"Root folder of datasets (default ${DATA_ENV}).")
@click.option("--json", "as_json", is_flag=True, help="Print the deploy-check record as one JSON object on stdout.")
@click.option("--no-store", is_flag=True, help="Do not store the record (default: stored beside the evaluations).")
@click.option("--weights", type=click.Path(), default=None,
              help="Local checkpoint file or folder of the float model (as given to 'qbench quantize').")
@store_option
@weights_options
@batching_options
@threads_option
def deploy_check_command(checkpoint_dir, suites, engine, device, limit, no_compile, repeats, data_root, as_json, no_store,
                         weights, store_path, hf_cache, allow_download, random_init, batch_size, workers, threads) -> None:
    """Run the quantized CHECKPOINT on real int8 kernels and compare it with its simulation on SUITE.

    Each image goes once through the FP32, the simulated (fake-quant) and the engine's image tower; every
    metric of the suite is scored from the simulated and from the real model, side by side, with per-image
    prediction agreement, embedding error against FP32, a per-layer check on identical inputs and the speed
    of one interleaved timing run. A checkpoint no integer engine can run is one 'not exportable' line.
    """
    network_policy(allow_download)
    from qbench.data import resolve_data_root
    from qbench.engine.deploy.check import DeployCheckRequest, check_request, run_deploy_check
    from qbench.engine.store import ResultStore
    from qbench.engine.threads import apply_threads

    if weights is not None and not Path(weights).expanduser().exists():
        raise QbenchError(f"checkpoint path {weights} does not exist; pass --weights a checkpoint file or folder")
    request = DeployCheckRequest(checkpoint=checkpoint_dir, suites=tuple(dict.fromkeys(suites)), engine=engine,
                                 device=device, limit=limit, compile=not no_compile, repeats=repeats,
                                 data_root=resolve_data_root(data_root), batch_size=batch_size, workers=workers,
                                 weights=weights, hf_cache=hf_cache, allow_download=allow_download, random_init=random_init)
    check_request(request)  # device, engine extra, checkpoint folder: one line before anything loads
    store = None if no_store else ResultStore(store_path)
    request = dataclasses.replace(request, threads=apply_threads(threads))
    record = run_deploy_check(request, registry(), RichProgress())
    if store is not None:
        path = store.put_deploy_check(record)
        stderr.print(f"stored the deploy check {record['config']['config_hash']} ({path}); "
                     f"report it with: qbench report {record['config']['config_hash']} --out DIR", highlight=False)
    if as_json:
        click.echo(json.dumps(record))
        return
    print_deploy_check(record)


def print_deploy_check(record: dict[str, Any]) -> None:
    """The human view of a deploy check: the tables of ``qbench report``'s section, then its notes."""
    from qbench.reporting.report import deploy_check_heading, deploy_check_notes, deploy_check_tables

    console = stdout_console()
    console.print(deploy_check_heading(record, 1).removeprefix("## Deploy check 1: ").replace("`", ""), highlight=False)
    for title, rows in deploy_check_tables(record)[1:]:
        table = Table(title=title, title_justify="left")
        for column in rows[0] if rows else ():
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(value).replace("`", "") for value in row.values()))
        console.print(table)
    for note in deploy_check_notes(record):
        console.print(f"note: {note}", style="dim", highlight=False, markup=False)


@cli.command("rescore")
@click.argument("document")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the recomputed sections (results, reliability, ...) as JSON.")
def rescore_command(document, store_path, as_json) -> None:
    """Recompute every evidence-backed number of DOCUMENT from its per-sample evidence and compare.

    DOCUMENT is a result JSON file (its '.evidence.safetensors' beside it, else the store's copy) or a
    stored config hash or unique prefix. Exits 2 with one line at the first number that differs from its
    evidence by more than 1e-9.
    """
    from qbench.engine.evidence import check_evidence, evidence_backed, locate

    loaded, evidence_path = locate(document, store_path)
    rescored = check_evidence(loaded, evidence_path, registry())
    if as_json:
        click.echo(json.dumps({"config_hash": loaded["config"]["config_hash"], "results": rescored.results,
                               "reliability": rescored.reliability, "bin_trajectories": rescored.bin_trajectories,
                               "ood_histograms": rescored.ood_histograms}, indent=2, sort_keys=True))
    records = loaded.get("results") or []
    backed = {id(record) for record in evidence_backed(records, rescored.unbacked_tasks)}
    unbacked = [record for record in records if id(record) not in backed]
    tasks = ", ".join(sorted({str(record.get("task")) for record in unbacked}))
    click.echo(f"{loaded['config']['config_hash']}: {len(rescored.results)} results, {len(rescored.reliability)} "
               f"reliability sections and {len(rescored.bin_trajectories)} bin trajectories recomputed from "
               f"{evidence_path}: all match"
               + (f" ({len(unbacked)} {tasks} records are not evidence-backed)" if unbacked else ""), err=True)


# -- leaderboard ---------------------------------------------------------------------------------
@cli.command("submit")
@click.argument("config_hash")
@store_option
@click.option("--submitter", default=None, help="Name shown in the leaderboard.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=str(DEFAULT_SUBMISSIONS),
              show_default=True, help="Folder of submission files.")
def submit_command(config_hash, store_path, submitter, out_dir) -> None:
    """Write the stored evaluation CONFIG_HASH (or a unique prefix) as a leaderboard submission file, with its
    per-sample evidence beside it."""
    from qbench.reporting.leaderboard import submission_from_eval, write_submission
    from qbench.engine.store import ResultStore

    check_output_folder(out_dir, "--out")  # before the store is read: a file in the way is one line
    store = ResultStore(store_path)
    full_hash = store.match_hash(config_hash)
    document = store.get(full_hash)
    if document is None:
        raise QbenchError(f"no evaluation {config_hash!r} in the store; see 'qbench results' for stored hashes")
    submission = submission_from_eval(document, submitter)
    path = write_submission(submission, Path(out_dir), store.evidence_path(full_hash))
    stderr.print(f"wrote {path}; run 'qbench leaderboard' to re-render the table")


@cli.command("leaderboard")
@click.option("--submissions", "submissions_dir", type=click.Path(file_okay=False),
              default=str(DEFAULT_SUBMISSIONS), show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=str(DEFAULT_LEADERBOARD),
              show_default=True, help="Markdown file to (re)write.")
@click.option("--include-store", is_flag=True, help="Also list the verified evaluations of the results store.")
@store_option
@click.option("--check", is_flag=True, help="Validate only; exit non-zero if the markdown is out of date.")
def leaderboard_command(submissions_dir, out_path, include_store, store_path, check) -> None:
    """Validate submissions and re-render the markdown leaderboard from them (and the store)."""
    from qbench.reporting.leaderboard import load_submissions, render_markdown, validate_submission
    from qbench.engine.store import ResultStore

    submissions = load_submissions(Path(submissions_dir))
    if include_store:
        seen = {submission.config_hash for submission in submissions}
        refused = []
        for document in ResultStore(store_path).documents():
            if document["config"]["config_hash"] in seen:
                continue
            try:  # the store holds every run (--limit, random init, ...); list only the leaderboard-worthy ones
                submissions.append(validate_submission(document, f"store:{document['config']['config_hash']}"))
            except QbenchError as error:
                refused.append(str(error))
        if refused:
            stderr.print(f"left out {len(refused)} stored evaluations that are not leaderboard submissions "
                         f"(first: {refused[0]})", markup=False, highlight=False, soft_wrap=True)
    markdown = render_markdown(submissions)
    target = Path(out_path)
    if check:
        current = target.read_bytes() if target.is_file() else b""
        if current != markdown.encode():
            raise QbenchError(f"{target} is out of date; run 'qbench leaderboard' to re-render it")
        stderr.print(f"{target} is up to date ({len(submissions)} submissions)")
        return
    from qbench.atomic import write_atomic

    try:
        write_atomic(target, markdown)
    except OSError as error:
        raise QbenchError(f"cannot write {target} ({error.strerror or error}); pass --out with a writable file path") from None
    stderr.print(f"wrote {target} ({len(submissions)} submissions)")


from qbench.cli.sweep import sweep_group  # noqa: E402  (the sweep commands build on the eval options above)

cli.add_command(sweep_group)

if __name__ == "__main__":  # pragma: no cover
    main()
