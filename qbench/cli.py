"""The ``qbench`` command line: list plugins, evaluate, export results, render the leaderboard.

User errors (:class:`~qbench.errors.QbenchError`) print one line, ``qbench: <what and how to fix>``,
and exit with status 2; no traceback. Machine-readable output goes to stdout, progress and logs to
stderr. Heavy libraries (torch, open_clip) are imported only by the commands that need them.
"""

from __future__ import annotations

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

stderr = Console(stderr=True)
DATA_ENV = "QBENCH_DATA"
DEFAULT_SUBMISSIONS = Path("leaderboard") / "submissions"
DEFAULT_LEADERBOARD = Path("leaderboard") / "README.md"


def stdout_console() -> Console:
    """The console for tables on stdout; wide when piped, so no column is cut to an ellipsis."""
    return Console(width=None if sys.stdout.isatty() else 160)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the click group, turning user errors into one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let a library look for missing files online
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    try:
        cli.main(args=argv, prog_name="qbench", standalone_mode=False)
    except QbenchError as error:
        stderr.print(f"qbench: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        stderr.print("qbench: aborted", markup=False)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        stderr.print("qbench: interrupted; results of finished evaluations are in the store", markup=False)
        sys.exit(130)


@functools.cache
def registry():
    from qbench.registry import build_registry

    return build_registry()


@click.group()
@click.version_option(__version__, prog_name="qbench")
def cli() -> None:
    """Measure what quantization does to vision-language models beyond accuracy."""


# -- list ----------------------------------------------------------------------------------------
def _describe(kind: str, value: Any) -> dict[str, str]:
    if kind == "models":
        return {"details": f"{value.family} · {value.arch} · {value.pretraining_data}",
                "weights": f"{value.weights_tag} ({'local' if value.weights_available() else 'missing'})"}
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
    return {"details": value.description}


@cli.command("list")
@click.argument("kind", required=False,
                type=click.Choice(["models", "quantizers", "scorers", "suites", "datasets", "proxies"]))
def list_command(kind: str | None) -> None:
    """List registered plugins of one KIND (default: all), with the plugin that registered each."""
    console = stdout_console()
    for current in [kind] if kind else list(registry()):
        rows = [(entry.name, _describe(current, entry.value), entry.source) for entry in registry().entries(current)]
        table = Table(title=current, title_justify="left")
        table.add_column("name", style="bold")
        extra_columns = list(rows[0][1]) if rows else ["details"]
        for column in extra_columns:
            table.add_column(column)
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


def _parse_qparams(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep or not key.strip():
            raise QbenchError(f"bad --qparam {value!r}: use NAME=VALUE, e.g. --qparam n_calibration=512")
        pairs.append((key.strip(), raw.strip()))
    return tuple(pairs)


def store_option(function: Callable) -> Callable:
    return click.option("--store", "store_path", type=click.Path(dir_okay=False),
                        help="Results database (default $QBENCH_STORE or ~/.cache/qbench/results.sqlite).")(function)


@cli.command("eval")
@click.option("--model", default="toy-clip", show_default=True, help="Model name (qbench list models).")
@click.option("--quantizer", default="minmax", show_default=True, help="Quantizer name (qbench list quantizers).")
@click.option("--suite", "suites", multiple=True, help="Suite name; repeat for several (default: toy-id).")
@click.option("--bits", default="w8a8", show_default=True, help="Bit spec wXaY, e.g. w8a8, w6a8, w4a8.")
@click.option("--scope", default="visual", show_default=True, help="visual (image tower) or joint (both towers).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for calibration sampling and training.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--qparam", multiple=True, help="Quantizer hyperparameter override NAME=VALUE (repeatable).")
@click.option("--proxy", default="toy-proxy", show_default=True, help="Calibration image-caption source.")
@click.option("--proxy-n", default=1000, show_default=True, type=int, help="Number of proxy pairs.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help=f"Root folder of datasets (default ${DATA_ENV}).")
@click.option("--weights", type=click.Path(), default=None, help="Local checkpoint file or folder for the model.")
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
@click.option("--force", is_flag=True, help="Re-run even if the store has this configuration.")
@store_option
def eval_command(model, quantizer, suites, bits, scope, seed, device, qparam, proxy, proxy_n, data_root,
                 weights, batch_size, as_json, force, store_path) -> None:
    """Evaluate MODEL in FP32 and quantized with QUANTIZER on one or more suites."""
    from qbench.evaluate import EvalRequest, resolve, run
    from qbench.store import ResultStore

    if batch_size < 1:
        raise QbenchError(f"bad --batch-size {batch_size}: it must be at least 1")
    if weights is not None and not Path(weights).expanduser().exists():
        raise QbenchError(f"checkpoint path {weights} does not exist; pass --weights a checkpoint file or folder")
    request = EvalRequest(
        model=model, quantizer=quantizer, quantizer_params=_parse_qparams(qparam), bits=bits, scope=scope,
        suites=tuple(suites) or ("toy-id",), seed=seed, device=device, proxy=proxy, proxy_n=proxy_n,
        data_root=data_root or os.environ.get(DATA_ENV), weights=weights, batch_size=batch_size,
    )
    resolved = resolve(request, registry())
    store = ResultStore(store_path)
    document = None if force else store.get(resolved.config["config_hash"])
    if document is not None:
        stderr.print(f"[dim]·[/dim] served from the store ({store.path}); use --force to re-run")
    else:
        document = run(resolved, RichProgress())
        store.put(document)
    if as_json:
        click.echo(json.dumps(document))
    else:
        print_document(document)


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if metric in ("accuracy", "ece") else f"{value:.4f}"


def print_document(document: dict[str, Any]) -> None:
    """The human view of an evaluation: configuration line, verification, metric table."""
    console = stdout_console()
    config = document["config"]
    console.print(
        f"[bold]{config['model']}[/bold] · {config['quantizer']} {config['bits']} ({config['scope']} scope) "
        f"· seed {config['seed']} · config {config['config_hash']}"
    )
    verification = document["verification"]
    status = "[green]passed[/green]" if verification["passed"] else "[red]FAILED[/red]"
    console.print(f"verification (at most 2^b distinct values per quantized tensor): {status}, "
                  f"{verification['n_modules']} quantized modules")
    for problem in verification.get("problems", []):
        console.print(f"  [red]problem:[/red] {problem}")
    table = Table(show_lines=False)
    for column in ("suite", "dataset", "metric", "fp32", "quantized", "relative change"):
        table.add_column(column, justify="right" if column in ("fp32", "quantized", "relative change") else "left")
    for record in document["results"]:
        delta = record["delta"]
        table.add_row(record["suite"], record["dataset"], record["metric"],
                      _fmt(record["fp32"], record["metric"]), _fmt(record["quantized"], record["metric"]),
                      "-" if delta is None else f"{100 * delta:+.2f}%")
    console.print(table)
    console.print("[dim]relative change = (fp32 - quantized) / fp32; positive = the quantized value is lower[/dim]")


# -- results -------------------------------------------------------------------------------------
@cli.command("results")
@store_option
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write all result records as CSV.")
def results_command(store_path, csv_path) -> None:
    """List stored evaluations, or export every result record to CSV."""
    from qbench.store import ResultStore

    store = ResultStore(store_path)
    if csv_path:
        rows = store.export_csv(csv_path)
        stderr.print(f"wrote {rows} result records to {csv_path}")
        return
    table = Table(title=f"evaluations in {store.path}", title_justify="left")
    for column in ("config hash", "created", "model", "quantizer", "bits", "scope", "suites", "verified"):
        table.add_column(column)
    for document in store.documents():
        config = document["config"]
        table.add_row(config["config_hash"], document["provenance"]["created_at"], config["model"],
                      config["quantizer"], config["bits"], config["scope"],
                      ", ".join(f"{s['name']}@{s['version']}" for s in config["suites"]),
                      "yes" if document["verification"]["passed"] else "NO")
    stdout_console().print(table)


# -- leaderboard ---------------------------------------------------------------------------------
@cli.command("submit")
@click.argument("config_hash")
@store_option
@click.option("--submitter", default=None, help="Name shown in the leaderboard.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=str(DEFAULT_SUBMISSIONS),
              show_default=True, help="Folder of submission files.")
def submit_command(config_hash, store_path, submitter, out_dir) -> None:
    """Write the stored evaluation CONFIG_HASH as a leaderboard submission file."""
    from qbench.leaderboard import submission_filename, submission_from_eval
    from qbench.store import ResultStore

    document = ResultStore(store_path).get(config_hash)
    if document is None:
        raise QbenchError(f"no evaluation {config_hash!r} in the store; see 'qbench results' for stored hashes")
    submission = submission_from_eval(document, submitter)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / submission_filename(submission)
    path.write_text(json.dumps(submission, indent=2, sort_keys=True) + "\n")
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
    from qbench.leaderboard import load_submissions, render_markdown, validate_submission
    from qbench.store import ResultStore

    submissions = load_submissions(Path(submissions_dir))
    if include_store:
        seen = {submission.config_hash for submission in submissions}
        for document in ResultStore(store_path).documents():
            if document["config"]["config_hash"] in seen or not document["verification"]["passed"]:
                continue
            submissions.append(validate_submission(document, f"store:{document['config']['config_hash']}"))
    markdown = render_markdown(submissions)
    target = Path(out_path)
    if check:
        current = target.read_text() if target.exists() else ""
        if current != markdown:
            raise QbenchError(f"{target} is out of date; run 'qbench leaderboard' to re-render it")
        stderr.print(f"{target} is up to date ({len(submissions)} submissions)")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(markdown)
    stderr.print(f"wrote {target} ({len(submissions)} submissions)")


if __name__ == "__main__":  # pragma: no cover
    main()
