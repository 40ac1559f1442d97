"""``qbench report``: figures and a markdown page for one or more evaluation documents (issue 7, item 5).

:func:`write_report` draws every figure of :mod:`qbench.reporting.plots` (PNG + CSV) into a folder and writes
``report.md`` beside them: a section per run with its configuration, the metric tables read
generically from the result records (paired records as FP32 / quantized / relative change, single-value
records as one value; ``../shared/specs/scoring.md`` §2.6 for δ), and the figures embedded by relative
path with a link to their data. When several documents are the same configuration at several seeds,
the seed-statistics table of :func:`qbench.analysis.seed_stats.seed_statistics` (§2.7) comes first.

:func:`select_documents` turns the ``RUN_OR_QUERY`` argument into documents: a JSON file (an
``eval --json`` document, a ``{"runs": [...]}`` object or a leaderboard submission), a stored config
hash or unique prefix, or a ``key=value[,key=value]`` query over the stored configurations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qbench import __version__

from qbench.reporting import plots
from qbench.errors import QbenchError
from qbench.analysis.metrics import PERCENT_METRICS, SINGLE_VALUE_METRICS
from qbench.analysis.seed_stats import format_difference

Document = Mapping[str, Any]
Record = Mapping[str, Any]

REPORT_NAME = "report.md"
OOD_METRIC_NAMES = {"auroc": "AUROC", "fpr95": "FPR@95", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out"}
QUERY_KEYS = ("model", "quantizer", "bits", "scope", "seed", "suite")
TASK_TITLES = {"robustness": "Robustness", "spurious": "Spurious correlation", "spectral": "Spectral analysis",
               "dropout": "Weight-dropout probe"}


# -- choosing the documents ---------------------------------------------------------------------
def select_documents(run_or_query: str, store_path: str | Path | None = None) -> list[dict[str, Any]]:
    """Documents named by ``run_or_query``: a JSON file, a config hash (or unique prefix), or a query."""
    candidate = Path(run_or_query).expanduser()
    if candidate.is_file() or run_or_query.endswith(".json"):
        return documents_from_file(candidate)
    from qbench.engine.store import ResultStore

    store = ResultStore(store_path)
    stored = store.documents()
    if "=" in run_or_query:
        return query_documents(stored, run_or_query, store.path)
    return [document_by_hash(stored, run_or_query, store.path)]


def documents_from_file(path: Path) -> list[dict[str, Any]]:
    """The evaluation documents of an ``eval --json`` output, a ``{"runs": [...]}`` object or a submission."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QbenchError(f"no file {path}; pass an 'eval --json' file, a config hash or a query such as bits=w4a8") from None
    except (OSError, UnicodeDecodeError) as error:
        raise QbenchError(f"cannot read {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise QbenchError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    documents = loaded.get("runs") if isinstance(loaded, dict) and "runs" in loaded else [loaded]
    if not isinstance(documents, list) or not documents or not all(_is_document(item) for item in documents):
        raise QbenchError(f"{path} is not an evaluation: expected the output of 'qbench eval --json' "
                          "(an object with config and results, or {\"runs\": [...]}) or a leaderboard submission")
    return documents


def _is_document(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("config"), dict) and isinstance(item.get("results"), list)


def document_by_hash(stored: Sequence[dict[str, Any]], prefix: str, store_path: Path) -> dict[str, Any]:
    """The stored document whose config hash is ``prefix`` or uniquely starts with it."""
    exact = [document for document in stored if document["config"]["config_hash"] == prefix]
    matches = exact or [document for document in stored if document["config"]["config_hash"].startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise QbenchError(f"no evaluation {prefix!r} in the store {store_path} ({_stored_summary(stored)}); see "
                          "'qbench results' for stored hashes, or pass an 'eval --json' file or a query such as bits=w4a8")
    hashes = ", ".join(document["config"]["config_hash"] for document in matches)
    raise QbenchError(f"config hash prefix {prefix!r} is ambiguous: it matches {hashes}; give more characters")


def parse_query(query: str) -> list[tuple[str, str]]:
    """``key=value[,key=value...]`` as pairs; keys are the config fields of :data:`QUERY_KEYS`."""
    pairs = []
    for part in query.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise QbenchError(f"bad query {query!r}: use key=value[,key=value...], e.g. quantizer=NAME,bits=w4a8")
        if key not in QUERY_KEYS:
            raise QbenchError(f"bad query key {key!r}: use one of {', '.join(QUERY_KEYS)}")
        pairs.append((key, value))
    return pairs


def matches_query(document: Document, pairs: Iterable[tuple[str, str]]) -> bool:
    """Whether the document's config has every ``key=value`` (``suite`` matches any of its suites)."""
    config = document["config"]
    for key, value in pairs:
        if key == "suite":
            if value not in [suite.get("name") for suite in config.get("suites", [])]:
                return False
        elif str(config.get(key)) != value:
            return False
    return True


def query_documents(stored: Sequence[dict[str, Any]], query: str, store_path: Path) -> list[dict[str, Any]]:
    """Stored documents matching the query, in stored order; none is a one-line error naming what is stored."""
    pairs = parse_query(query)
    found = [document for document in stored if matches_query(document, pairs)]
    if not found:
        raise QbenchError(f"no stored evaluation matches {query} in {store_path} ({_stored_summary(stored)}); "
                          "see 'qbench results'")
    return found


def _stored_summary(stored: Sequence[Document], limit: int = 4) -> str:
    if not stored:
        return "the store is empty"
    shown = [f"{doc['config']['config_hash']} {doc['config']['model']} {plots.run_label(doc)}" for doc in stored[:limit]]
    more = f", and {len(stored) - limit} more" if len(stored) > limit else ""
    return f"stored: {'; '.join(shown)}{more}"


# -- formatting ---------------------------------------------------------------------------------
def is_single_value(record: Record) -> bool:
    """A single-value record (``value`` set, no FP32/quantized pair), per the issue 7 record contract."""
    return record.get("metric") in SINGLE_VALUE_METRICS or (
        "value" in record and record.get("fp32") is None and record.get("quantized") is None)


def format_value(value: Any, metric: str) -> str:
    """A metric value for a table: percent for [0, 1] metrics, dB for SQNR, an integer for k_sat."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if metric in PERCENT_METRICS:
        return f"{100 * value:.2f}%"
    if metric == "sqnr_db":
        return f"{value:.2f} dB"
    if metric == "k_sat":
        return str(int(value))
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def format_delta(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def markdown_table(rows: Sequence[Mapping[str, str]]) -> str:
    """GitHub markdown table of string rows (columns from the first row); ``|`` in cells is escaped."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row.get(column, "")).replace("|", "\\|") for column in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- tables -------------------------------------------------------------------------------------
def _tuned_column(records: Sequence[Record]) -> bool:
    return any(record.get("logit_tuned") for record in records)


def _optional(records: Sequence[Record], key: str) -> bool:
    return any(record.get(key) not in (None, "") for record in records)


def paired_rows(records: Sequence[Record]) -> list[dict[str, str]]:
    """FP32, quantized, relative change and difference per paired record; optional columns only when used."""
    tuned, has_param, has_scorer = _tuned_column(records), _optional(records, "param"), _optional(records, "scorer")
    rows = []
    for record in records:
        metric = record.get("metric", "")
        row = {"suite": record.get("suite", ""), "dataset": record.get("dataset", ""), "metric": metric}
        if has_scorer:
            row["scorer"] = record.get("scorer") or ""
        if has_param:
            row["param"] = record.get("param") or ""
        if tuned:
            row["tuned"] = "yes" if record.get("logit_tuned") else "no"
        row.update({"FP32": format_value(record.get("fp32"), metric), "quantized": format_value(record.get("quantized"), metric),
                    "δ = (fp − q)/fp": format_delta(record.get("delta")), "q − fp": format_difference(record.get("diff"), metric)})
        rows.append(row)
    return rows


def single_value_rows(records: Sequence[Record]) -> list[dict[str, str]]:
    """One value per single-value record."""
    tuned, has_param = _tuned_column(records), _optional(records, "param")
    rows = []
    for record in records:
        row = {"suite": record.get("suite", ""), "dataset": record.get("dataset", ""), "metric": record.get("metric", "")}
        if has_param:
            row["param"] = record.get("param") or ""
        if tuned:
            row["tuned"] = "yes" if record.get("logit_tuned") else "no"
        row["value"] = format_value(record.get("value"), record.get("metric", ""))
        rows.append(row)
    return rows


def detection_rows(records: Sequence[Record]) -> list[dict[str, str]]:
    """One row per (suite, scorer, ID vs OOD, tuned), one ``fp32 → quantized`` cell per OOD metric."""
    metrics = list(dict.fromkeys(record.get("metric", "") for record in records))
    tuned = _tuned_column(records)
    grouped: dict[tuple, dict[str, str]] = {}
    for record in records:
        key = (record.get("suite", ""), record.get("scorer", ""), record.get("id_dataset", ""), record.get("ood_dataset", ""),
               record.get("ood_kind", ""), bool(record.get("logit_tuned")))
        grouped.setdefault(key, {})[record.get("metric", "")] = (
            f"{format_value(record.get('fp32'), record.get('metric', ''))} → "
            f"{format_value(record.get('quantized'), record.get('metric', ''))}")
    rows = []
    for (suite, scorer, id_dataset, ood_dataset, kind, is_tuned), cells in grouped.items():
        row = {"suite": suite, "scorer": scorer, "ID": id_dataset, "OOD": ood_dataset, "kind": kind}
        if tuned:
            row["tuned"] = "yes" if is_tuned else "no"
        row.update({f"{OOD_METRIC_NAMES.get(metric, metric)} (fp32 → q)": cells.get(metric, "-") for metric in metrics})
        rows.append(row)
    return rows


def task_tables(document: Document) -> list[tuple[str, str]]:
    """(heading, markdown table) for every kind of result record in the document, read generically.

    Zero-shot and detection records get their own tables; every other task's records (a built-in task type's
    or a plugin's, known here or not) a table of its paired records (FP32, quantized, δ, difference per metric,
    dataset and param) and one of its single-value records, under the task's title or its name.
    """
    records = [record for record in document.get("results", []) if isinstance(record, Mapping)]
    detection = [record for record in records if record.get("ood_dataset") is not None]
    others = [record for record in records if record.get("ood_dataset") is None]
    tables = []
    zero_shot = [record for record in others if record.get("task", "zeroshot") == "zeroshot"]
    if zero_shot:
        tables.append(("Zero-shot classification", markdown_table(paired_rows(zero_shot))))
    ood = [record for record in detection if record.get("ood_kind") != "shift"]
    if ood:
        tables.append(("OOD detection", markdown_table(detection_rows(ood))))
    shift = [record for record in detection if record.get("ood_kind") == "shift"]
    if shift:
        tables.append(("Shift detection (clean as ID, shifted as OOD)", markdown_table(detection_rows(shift))))
    for task in dict.fromkeys(record.get("task") for record in others if record.get("task", "zeroshot") != "zeroshot"):
        of_task = [record for record in others if record.get("task") == task]
        title = TASK_TITLES.get(task, str(task))
        paired = [record for record in of_task if not is_single_value(record)]
        single = [record for record in of_task if is_single_value(record)]
        if paired:
            tables.append((title, markdown_table(paired_rows(paired))))
        if single:
            tables.append((f"{title}: single-value records", markdown_table(single_value_rows(single))))
    return tables


# -- the report ---------------------------------------------------------------------------------
def _alt(text: str) -> str:
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace("\n", " ")


def figure_markdown(figure: plots.Figure) -> str:
    """The figure embedded by relative path, its caption, and a link to its CSV."""
    return (f"![{_alt(figure.caption)}]({figure.png.name})\n\n"
            f"*{figure.title}.* {figure.caption} [Data (CSV)]({figure.csv.name})\n")


def run_heading(document: Document, position: int) -> str:
    """The run's section heading; a ``--limit`` run is marked PARTIAL in it."""
    config = document["config"]
    partial = f" · PARTIAL (--limit {config['limit']})" if config.get("limit") is not None else ""
    return (f"## Run {position}: {config.get('model')} · {config.get('quantizer')} {config.get('bits')} "
            f"({config.get('scope')} scope) · seed {config.get('seed')} · `{config.get('config_hash')}`{partial}")


def config_table(document: Document) -> str:
    config = document["config"]
    verification = document.get("verification", {})
    row = {"model": str(config.get("model")), "weights": str(config.get("weights_tag", "-")),
           "quantizer": str(config.get("quantizer")), "bits": str(config.get("bits")), "scope": str(config.get("scope")),
           "seed": str(config.get("seed")),
           "suites": ", ".join(f"{s.get('name')}@{s.get('version')}" for s in config.get("suites", [])),
           "images": "all" if config.get("limit") is None else f"first {config['limit']} per dataset (partial run)",
           "logit tuning": "yes" if config.get("logit_tuning") else "no",
           "verified": "-" if "passed" not in verification else "yes" if verification["passed"] else "NO",
           "config hash": f"`{config.get('config_hash')}`"}
    return markdown_table([row])


def run_notes(document: Document) -> list[str]:
    """Notes worth reading beside the numbers: spectral and dataset notes, skipped scorers."""
    notes = [f"spectral ({entry.get('dataset')}): {note}" for entry in document.get("spectral", []) or []
             for note in entry.get("notes", []) or []]
    notes += [f"{name}: {note}" for name, info in (document.get("datasets") or {}).items() for note in info.get("notes", []) or []]
    notes += [f"{name}: {info['unreadable']} unreadable image(s) skipped (e.g. "
              f"{', '.join(map(str, (info.get('unreadable_examples') or [])[:2])) or '-'})"
              for name, info in (document.get("datasets") or {}).items() if info.get("unreadable")]
    notes += [f"skipped {item.get('scorer')} on {item.get('suite')}/{item.get('ood_dataset')}: {item.get('reason')}"
              for item in document.get("skipped", []) or []]
    return notes


def run_section(document: Document, position: int, figures: Sequence[plots.Figure]) -> list[str]:
    lines = [run_heading(document, position), "", config_table(document)]
    for heading, table in task_tables(document):
        lines += [f"### {heading}", "", table]
    notes = run_notes(document)
    if notes:
        lines += ["### Notes", "", *[f"- {note}" for note in notes], ""]
    if figures:
        lines += ["### Figures", ""]
        for figure in figures:
            lines += [figure_markdown(figure)]
    return lines


def write_report(documents: list[dict], out_dir: Path, deploy_checks: Sequence[Document] = ()) -> Path:
    """Write every figure (PNG + CSV) and ``report.md`` for ``documents`` into ``out_dir``; return the page's path.

    Several runs: per-run figures carry each run's config hash; robustness bars of all runs share one
    chart per suite. When some configuration appears at several seeds, the table of
    :func:`qbench.analysis.seed_stats.seed_statistics` comes first. ``deploy_checks`` (``qbench deploy-check``
    records) add a section each after the runs (:func:`deploy_check_section`); a report may hold only those.
    """
    documents = list(documents)
    deploy_checks = list(deploy_checks)
    if not documents and not deploy_checks:
        raise QbenchError("nothing to report: no evaluation documents given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    several = len(documents) > 1
    checks = f"{len(deploy_checks)} deploy check{'s' if len(deploy_checks) > 1 else ''}" if deploy_checks else ""
    runs = f"{len(documents)} evaluation{'s' if several else ''}" if documents or not checks else ""
    lines = ["# qbench report", "",
             f"{' and '.join(part for part in (runs, checks) if part)}, written by qbench {__version__}. "
             "Relative change δ = (fp32 − quantized)/fp32 (> 0: the quantized model is lower); q − fp is the plain "
             "difference (pp = percentage points). Every figure links the CSV of the numbers it draws.", ""]
    if several:
        from qbench.analysis.seed_stats import seed_statistics, seed_statistics_markdown

        table = seed_statistics_markdown(seed_statistics(documents))
        if table:
            lines += ["## Statistics over seeds", "", table, ""]
    if several:
        table = markdown_table(redundancy_rows(documents))
        if table:
            lines += ["## Weight-dropout redundancy vs PTQ degradation", "",
                      f"Across models: δ_drop at p = {HEADLINE_DROPOUT_RATE} (the float model's relative accuracy loss under "
                      "random weight dropout) against each quantization configuration's relative accuracy change δ_PTQ "
                      "on its first accuracy record (scoring.md §4). Spearman ρ and Pearson r with two-sided permutation "
                      "p-values (every order enumerated up to 8 models, else 10,000 seeded shuffles) and the bootstrap "
                      "95% CI of ρ over models. ρ > 0: models fragile to dropout are fragile to PTQ.", "", table, ""]
        grouped = [plots.robustness_figure(documents, suite, out_dir) for suite in plots.robustness_suites(documents)]
        grouped = [figure for figure in grouped if figure is not None]
        if grouped:
            lines += ["## Robustness across runs", ""] + [figure_markdown(figure) for figure in grouped]
    for position, document in enumerate(documents, start=1):
        figures = plots.run_figures(document, out_dir, include_robustness=not several)
        lines += run_section(document, position, figures)
    for position, record in enumerate(deploy_checks, start=1):
        lines += deploy_check_section(record, position)
    path = out_dir / REPORT_NAME
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


HEADLINE_DROPOUT_RATE = "0.10"
"""p* of scoring.md §4: the dropout rate whose δ_drop is correlated with PTQ degradation."""


def _first_accuracy_delta(document: Document) -> float | None:
    """δ of the run's first untuned plain accuracy record (a zero-shot task, or a robustness task's clean split)."""
    for record in document["results"]:
        if (record.get("metric", "") == "accuracy" and not record.get("scorer") and not record.get("logit_tuned")
                and (record.get("task", "zeroshot") == "zeroshot" or record.get("role") == "clean")):
            return record.get("delta")
    return None


def _dropout_delta(document: Document) -> float | None:
    for record in document["results"]:
        if record.get("task") == "dropout" and record.get("metric", "") == "dropout_delta" and record.get("param") == f"p={HEADLINE_DROPOUT_RATE}":
            return record.get("value")
    return None


def redundancy_rows(documents: Sequence[Document]) -> list[dict[str, str]]:
    """One row per quantization configuration run on at least three models that also have a dropout probe."""
    from qbench.analysis.statistics import redundancy_correlation

    dropout: dict[str, float] = {}
    for document in documents:
        value = _dropout_delta(document)
        if value is not None:
            dropout.setdefault(document["config"]["model"], value)
    groups: dict[tuple[str, str, str], dict[str, float]] = {}
    for document in documents:
        config = document["config"]
        delta = _first_accuracy_delta(document)
        if config["quantizer"] == "fp32" or delta is None or config["model"] not in dropout:
            continue
        groups.setdefault((config["quantizer"], config["bits"], config["scope"]), {}).setdefault(config["model"], delta)
    rows = []
    for (quantizer, bits, scope), by_model in groups.items():
        if len(by_model) < 3:
            continue
        models = sorted(by_model)
        result = redundancy_correlation([dropout[model] for model in models], [by_model[model] for model in models])
        rows.append({"quantizer": quantizer, "bits": bits, "scope": scope, "models": str(result.n_models),
                     "Spearman ρ (p)": f"{result.spearman:+.3f} ({result.spearman_p:.3g})",
                     "Pearson r (p)": f"{result.pearson:+.3f} ({result.pearson_p:.3g})",
                     "ρ 95% CI": f"[{result.spearman_ci_low:+.2f}, {result.spearman_ci_high:+.2f}]",
                     "permutations": f"{result.permutations} ({'exact' if result.exact else 'sampled'})"})
    return rows


EMBEDDED_IMAGE = re.compile(r"!\[(?:\\.|[^\]\\])*\]\(([^)\s]+)\)")


def report_figures(out_dir: Path) -> list[Path]:
    """The images ``report.md`` in ``out_dir`` embeds, in page order (stale files in the folder do not count)."""
    text = (Path(out_dir) / REPORT_NAME).read_text(encoding="utf-8")
    return [Path(out_dir) / name for name in EMBEDDED_IMAGE.findall(text)]


# -- deploy checks (qbench deploy-check, issue 17) ----------------------------------------------
SPEED_LABELS = {"fp32_eager": "FP32 eager (torch)", "fp32_engine": "FP32 on the engine", "simulated": "simulated (fake quant)",
                "real_int8": "real int8 (engine)"}
BAR_WIDTH = 30
"""Characters of the longest speed bar."""


def is_deploy_check(item: Any) -> bool:
    """Whether ``item`` is a ``qbench deploy-check`` record (``kind`` and a hashed ``config``)."""
    from qbench.engine.store import DEPLOY_CHECK_KIND

    return isinstance(item, dict) and item.get("kind") == DEPLOY_CHECK_KIND and isinstance(item.get("config"), dict)


def select_report(run_or_query: str, store_path: str | Path | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(evaluation documents, deploy-check records)`` named by ``run_or_query`` for ``qbench report``.

    A JSON file holding a deploy-check record (``deploy-check --json``) or a stored deploy-check hash (or unique
    prefix, when no evaluation has it) is reported alone; otherwise the evaluations of :func:`select_documents`, with
    the stored deploy checks of the checkpoints they were evaluated from (``config.checkpoint``)."""
    candidate = Path(run_or_query).expanduser()
    if candidate.is_file() or run_or_query.endswith(".json"):
        try:
            loaded = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            loaded = None  # documents_from_file says what is wrong, in one line
        if is_deploy_check(loaded):
            return [], [loaded]
        return documents_from_file(candidate), []
    from qbench.engine.store import ResultStore

    store = ResultStore(store_path)
    corrupt: list[Any] = []
    checks = store.deploy_checks(on_corrupt=corrupt.append)
    if "=" not in run_or_query:
        prefix = run_or_query.lower()
        exact = [record for record in checks if record["config"]["config_hash"] == prefix]
        found = exact or [record for record in checks if record["config"]["config_hash"].startswith(prefix)]
        named = [problem for problem in corrupt if Path(problem.path).stem.startswith(prefix)]
        if named and not found and not any(h.startswith(prefix) for h in store.stored_hashes()):
            problem = named[0]  # the deploy check asked for is on disk but fails its checks: say so, not "no evaluation"
            raise QbenchError(f"stored deploy check {problem.path} is corrupt ({problem.reason}); re-run "
                              "'qbench deploy-check' to replace it")
        if found and not any(h.startswith(prefix) for h in store.stored_hashes()):
            if len(found) > 1:
                hashes = ", ".join(record["config"]["config_hash"] for record in found)
                raise QbenchError(f"deploy-check hash prefix {run_or_query!r} is ambiguous: it matches {hashes}; give more characters")
            return [], found
    documents = select_documents(run_or_query, store_path)
    return documents, related_deploy_checks(documents, checks)


def related_deploy_checks(documents: Sequence[Document], checks: Sequence[Document]) -> list[Document]:
    """The deploy checks of the checkpoints ``documents`` were evaluated from (same checkpoint config hash and
    state SHA-256), in stored order."""
    sources = {(str(checkpoint.get("config_hash")), str(checkpoint.get("sha256")))
               for document in documents if isinstance(checkpoint := document["config"].get("checkpoint"), dict)}
    return [record for record in checks
            if isinstance(checkpoint := record["config"].get("checkpoint"), dict)
            and (str(checkpoint.get("config_hash")), str(checkpoint.get("sha256"))) in sources]


def _difference(value: float | None, metric: str) -> str:
    """``real − simulated``: percentage points for fraction metrics, with more digits than a q − fp cell (the
    differences are small)."""
    if value is None:
        return "-"
    return f"{100 * value:+.3f} pp" if metric in PERCENT_METRICS else f"{value:+.4g}"


def _share(value: float | None) -> str:
    """An agreement fraction as a percentage cell."""
    return "-" if value is None else f"{100 * value:.2f}%"


def _number_cell(value: float | None, digits: int = 4) -> str:
    """A plain number with ``digits`` significant digits ("-" when missing)."""
    return "-" if value is None else f"{value:.{digits}g}"


def speed_bar(ratio: float | None, longest: float) -> str:
    """A text bar of ``ratio`` (speed relative to FP32 eager), :data:`BAR_WIDTH` characters for ``longest``."""
    if ratio is None or longest <= 0:
        return ""
    return "█" * max(1, round(BAR_WIDTH * ratio / longest))


def deploy_check_heading(record: Document, position: int) -> str:
    """The section heading of a deploy check: model, quantizer, engine and device, its hash; PARTIAL with --limit."""
    config, engine = record["config"], record.get("engine", {})
    partial = f" · PARTIAL (--limit {config['limit']})" if config.get("limit") is not None else ""
    return (f"## Deploy check {position}: {config.get('model')} · {config.get('quantizer')} {config.get('bits')} · "
            f"{engine.get('engine', config.get('engine'))} {engine.get('version', '')} on {engine.get('device', config.get('device'))}"
            f" · `{config.get('config_hash')}`{partial}")


def deploy_check_tables(record: Document) -> list[tuple[str, list[dict[str, str]]]]:
    """(title, rows) of a deploy check, shared by ``qbench report`` (markdown) and ``qbench deploy-check`` (console):
    configuration, agreement and embeddings, simulated vs real per metric, the per-layer check, speed."""
    config, engine = record["config"], record.get("engine", {})
    speed, layers = record.get("speed", {}), record.get("layers", {})
    tables: list[tuple[str, list[dict[str, str]]]] = []
    tables.append(("Configuration", [{
        "model": str(config.get("model")), "quantizer": str(config.get("quantizer")), "bits": str(config.get("bits")),
        "scope": str(config.get("scope")),
        "suites": ", ".join(f"{s.get('name')}@{s.get('version')}" for s in config.get("suites", [])),
        "images": "all" if config.get("limit") is None else f"first {config['limit']} per dataset (partial)",
        "engine": f"{engine.get('engine')} {engine.get('version')}", "device": str(engine.get("device")),
        "compiled": "yes" if engine.get("compile") else "no",
        "int8 layers": str(len(engine.get("int8_layers", []))),
        "threads": str(speed.get("threads", "-")),
        "verified": "yes" if record.get("verification", {}).get("passed") else "NO",
        "checkpoint": f"`{record.get('checkpoint', {}).get('config_hash', '-')}`",
        "config hash": f"`{config.get('config_hash')}`"}]))
    agreement, embeddings = record.get("agreement", {}), record.get("embeddings", {})
    rows = []
    scopes = [(name, (agreement.get("datasets") or {}).get(name), stats)
              for name, stats in (embeddings.get("datasets") or {}).items()]
    scopes.append(("all images", agreement.get("all"), embeddings.get("all")))
    for name, agree, stats in scopes:
        agree, stats = agree or {}, stats or {}
        sim, real = stats.get("simulated_vs_fp32", {}), stats.get("real_vs_fp32", {})
        ratio = None if not sim.get("rel_l2") else real.get("rel_l2", 0.0) / sim["rel_l2"]
        rows.append({"images": name, "n": str(agree.get("n", sim.get("n", "-"))),
                     "top-1 real = sim": _share(agree.get("real_vs_simulated")),
                     "top-1 sim = fp32": _share(agree.get("simulated_vs_fp32")),
                     "top-1 real = fp32": _share(agree.get("real_vs_fp32")),
                     "cos sim·fp32": _number_cell(sim.get("cosine"), 6), "cos real·fp32": _number_cell(real.get("cosine"), 6),
                     "relL2 sim": _number_cell(sim.get("rel_l2")), "relL2 real": _number_cell(real.get("rel_l2")),
                     "relL2 real/sim": _number_cell(ratio, 3),
                     "relL2 real vs sim": _number_cell(stats.get("real_vs_simulated", {}).get("rel_l2"))})
    tables.append(("Agreement and embeddings (against FP32; real = the engine, sim = fake quantization)", rows))
    metrics = [row for row in record.get("metrics", []) if isinstance(row, Mapping)]
    optional = [key for key in ("scorer", "ood_dataset", "role", "param", "group") if _optional(metrics, key)]
    has_delta = any("delta_simulated" in row for row in metrics)
    rows = []
    for row in metrics:
        metric = str(row.get("metric", ""))
        cells = {"suite": str(row.get("suite", "")), "dataset": str(row.get("dataset", "")), "metric": metric}
        cells.update({key: str(row.get(key) or "") for key in optional})
        cells.update({"FP32": format_value(row.get("fp32"), metric), "simulated": format_value(row.get("simulated"), metric),
                      "real int8": format_value(row.get("real"), metric),
                      "real − sim": _difference(row.get("difference"), metric)})
        if has_delta:
            cells.update({"δ sim": format_delta(row.get("delta_simulated")), "δ real": format_delta(row.get("delta_real"))})
        rows.append(cells)
    tables.append(("Simulated vs real int8, per metric", rows))
    if layers.get("available") is False:
        rows = [{"layers": "-", "result": "the engine has no per-layer entry point"}]
    else:
        rows = [{"layers": str(layers.get("n_layers", "-")), "images": str(layers.get("images", "-")),
                 "tolerance (relL2)": f"{layers.get('tolerance', 0):.0e}",
                 "max relL2": _number_cell(layers.get("max_rel_l2"), 3), "worst layer": str(layers.get("worst_layer", "-")),
                 "failed": str(layers.get("n_failed", "-")), "result": "passed" if layers.get("passed") else "FAILED"}]
    tables.append(("Per-layer check (identical inputs: the engine's layer vs the simulated module)", rows))
    medians, ratios = speed.get("median_ms", {}), speed.get("ratios", {})
    fastest = [medians["fp32_eager"] / value for value in medians.values() if value and medians.get("fp32_eager")]
    longest = max(fastest) if fastest else 0.0
    rows = []
    for name in ("fp32_eager", "fp32_engine", "simulated", "real_int8"):
        if name not in medians:
            continue
        ratio = medians["fp32_eager"] / medians[name] if medians.get("fp32_eager") and medians[name] else None
        rows.append({"encoder": SPEED_LABELS.get(name, name), "median ms": f"{medians[name]:.2f}",
                     "speed vs FP32 eager": "-" if ratio is None else f"{ratio:.2f}×", "bar": speed_bar(ratio, longest)})
    if ratios.get("real_int8_vs_fp32_engine") is not None:
        rows.append({"encoder": "real int8 vs FP32 on the engine", "median ms": "",
                     "speed vs FP32 eager": f"{ratios['real_int8_vs_fp32_engine']:.2f}×", "bar": ""})
    tables.append((f"Speed (one interleaved run: batch {speed.get('batch', '-')}, median of {speed.get('repeats', '-')} "
                   f"repeats, {speed.get('threads', '-')} threads)", rows))
    return tables


def deploy_check_notes(record: Document) -> list[str]:
    """The engine's departures from qbench's arithmetic, the integer ops that ran, what ran in float, skips."""
    engine, plan = record.get("engine", {}), record.get("plan", {})
    notes = [f"int8 ops that ran: {', '.join(engine.get('int8_ops') or []) or 'none recorded'}"]
    notes += [f"engine: {note}" for note in engine.get("notes", []) or []]
    notes += [f"float map: {entry}" for entry in plan.get("float_ops", []) or []]
    notes += [f"simulated layer: {entry}" for entry in plan.get("simulated", []) or []]
    notes += [f"skipped {item.get('scorer')} on {item.get('suite')}/{item.get('ood_dataset')}: {item.get('reason')}"
              for item in record.get("skipped", []) or []]
    return notes


def deploy_check_section(record: Document, position: int) -> list[str]:
    """The markdown section of one deploy check: heading, its tables, its notes."""
    lines = [deploy_check_heading(record, position), ""]
    for title, rows in deploy_check_tables(record):
        lines += [f"### {title}", "", markdown_table(rows)]
    notes = deploy_check_notes(record)
    if notes:
        lines += ["### Notes", "", *[f"- {note}" for note in notes], ""]
    return lines
