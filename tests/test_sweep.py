"""``qbench sweep``: sweep files (axes, rules, one-line errors with line numbers), plan/run/status over submitit,
compute-once across a sweep (FP32 features encoded once), failures recorded in one line, and the SLURM path
checked through the sbatch script submitit writes (a stand-in ``sbatch`` on PATH records it)."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest

from cli_runner import run_cli
from qbench.cli import eval_base_request, eval_options_from_settings, registry
from qbench.errors import QbenchError
from qbench.engine.sweep import SweepSource, expand, parse_spec, read_sweep_file

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"limit": 60, "proxy_n": 60}


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def expanded(path: Path):
    data, source = read_sweep_file(path)
    spec = parse_spec(data, source)
    return expand(spec, registry(), lambda settings: eval_options_from_settings(settings, str(path)), eval_base_request)


def one_line_error(path: Path) -> str:
    with pytest.raises(QbenchError) as caught:
        expanded(path)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- the file format ---------------------------------------------------------------------------------
def test_axes_expand_to_their_product_with_family_and_qparam_variants(tmp_path):
    path = write(tmp_path, """
        version: 1
        models: [toy-clip]
        quantizers: [minmax, smoothquant, family:baseline]
        bits: [w8a8, w4a8]
        scopes: [visual, joint]
        seeds: [0, 1]
        suites: [toy-id, [toy-id, toy-ood]]
        qparams:
          smoothquant: [{alpha: 0.5}, {alpha: 0.8}]
        settings: {limit: 60, proxy_n: 60}
    """)
    sweep = expanded(path)
    # (minmax + 2 smoothquant variants + fp32) x 2 bits x 2 scopes x 2 seeds x 2 suite groups
    assert len(sweep.configs) == 4 * 2 * 2 * 2 * 2
    assert len({unit.config_hash for unit in sweep.configs}) == len(sweep.configs)
    alphas = {dict(unit.request.quantizer_params).get("alpha") for unit in sweep.configs if unit.request.quantizer == "smoothquant"}
    assert alphas == {"0.5", "0.8"}
    assert {unit.request.suites for unit in sweep.configs} == {("toy-id",), ("toy-id", "toy-ood")}
    assert all(unit.request.limit == 60 and unit.request.proxy_n == 60 for unit in sweep.units)
    # one warm unit (fp32 on the union of suites) for the one model/data group, run first
    warm = [unit for unit in sweep.units if unit.stage == "warm"]
    assert sweep.units[0].stage == "warm" and len(warm) == 1
    assert warm[0].request.quantizer == "fp32" and warm[0].request.suites == ("toy-id", "toy-ood")


def test_configurations_sharing_a_quantized_model_are_siblings(tmp_path):
    path = write(tmp_path, """
        version: 1
        quantizers: [minmax]
        suites: [toy-id, toy-ood]
        settings: {limit: 60, proxy_n: 60}
    """)
    configs = expanded(path).configs
    assert len(configs) == 2 and configs[0].quantization_hash == configs[1].quantization_hash
    assert set(configs[0].siblings) == {unit.config_hash for unit in configs}


def test_exclude_and_include_rules(tmp_path):
    path = write(tmp_path, """
        version: 1
        quantizers: [minmax, smoothquant]
        bits: [w8a8, w4a8]
        scopes: [visual, joint]
        exclude:
          - {quantizer: smoothquant, bits: w4a8}
          - {scope: joint, quantizer: [minmax]}
        include:
          - {quantizer: fp32, bits: w8a8, scope: visual, seeds: [3]}
        settings: {limit: 60, proxy_n: 60}
    """)
    grid = {(u.request.quantizer, u.request.bits, u.request.scope, u.request.seed) for u in expanded(path).configs}
    assert grid == {("minmax", "w8a8", "visual", 0), ("minmax", "w4a8", "visual", 0),
                    ("smoothquant", "w8a8", "visual", 0), ("smoothquant", "w8a8", "joint", 0),
                    ("fp32", "w8a8", "visual", 3)}


def test_schedule_sets_the_steps_of_qat_quantizers_only(tmp_path):
    path = write(tmp_path, """
        version: 1
        quantizers: [minmax, qat-ste]
        settings: {schedule: "7", limit: 60, proxy_n: 60}
    """)
    params = {unit.request.quantizer: dict(unit.request.quantizer_params) for unit in expanded(path).configs}
    assert params == {"minmax": {}, "qat-ste": {"steps": "7"}}


def test_scorer_settings_apply_to_the_configurations_with_ood_suites(tmp_path):
    path = write(tmp_path, """
        version: 1
        suites: [toy-id, toy-ood]
        settings: {scorer: [msp, energy], limit: 60, proxy_n: 60}
    """)
    sweep = expanded(path)
    scorers = {unit.request.suites: unit.request.scorers for unit in sweep.configs}
    assert scorers == {("toy-id",): (), ("toy-ood",): ("msp", "energy")}
    warm = next(unit for unit in sweep.units if unit.stage == "warm")
    assert warm.request.scorers == ("msp", "energy")  # it warms the text features these configurations read


def test_the_same_settings_give_the_same_hashes_as_qbench_eval(tmp_path, capsys):
    path = write(tmp_path, """
        version: 1
        quantizers: [minmax]
        bits: [w4a8]
        settings: {limit: 60, proxy_n: 60}
    """)
    from qbench.engine.evaluate import EvalRequest, resolve

    unit = expanded(path).configs[0]
    direct = resolve(EvalRequest(quantizer="minmax", bits="w4a8", limit=60, proxy_n=60), registry())
    assert unit.config_hash == direct.config["config_hash"]
    code, out, err = run_cli(capsys, "sweep", "plan", "--quantizer", "minmax", "--bits", "w4a8", "--limit", "60",
                             "--proxy-n", "60", "--json")
    assert code == 0, err
    assert unit.config_hash in {item["config_hash"] for item in json.loads(out)["units"]}


@pytest.mark.parametrize("content, expected", [
    ("version: 1\nmodels: [toy-clip]\nquantiser: [minmax]\n", r"sweep.yaml line 3 \(quantiser\): unknown key 'quantiser' \(did you mean 'quantizers'\?\)"),
    ("version: 1\nquantizers:\n  - minmax\n  - minmx\n", r"sweep.yaml line 4 \(quantizers.1\): .*'minmx'.*did you mean 'minmax'"),
    ("version: 1\nquantizers: [minmax]\nbits: [w8a8, w9a8]\n", r"sweep.yaml line 3 \(bits.1\): bad bit spec 'w9a8'"),
    ("version: 1\nbits: [w8a8]\nexclude:\n  - {bits: w8a8}\n", r"sweep.yaml.*the grid is empty"),
    ("version: 1\nmodels: [toy-clip\nbits: [w8a8]\n", r"sweep.yaml line \d+: not valid YAML"),
    ("models: [toy-clip]\n", r"sweep.yaml: 'version: 1' is required"),
    ("version: 1\nseeds: [0, -1]\n", r"sweep.yaml line 2 \(seeds.1\): bad seed -1"),
    ("version: 1\nbits: [w8a8]\nbits: [w4a8]\n", r"sweep.yaml line 3: duplicate key 'bits'"),
    ("version: 1\nexclude:\n  - {quantiser: minmax}\n", r"sweep.yaml line 3 \(exclude.0.quantiser\): unknown key 'quantiser'"),
    ("version: 1\nquantizers: [minmax]\nqparams:\n  smoothquant: {alpha: 0.5}\n", r"line 4 \(qparams.smoothquant\).*not on the quantizers axis"),
    ("version: 1\nquantizers: [minmax]\nqparams:\n  minmax: {alfa: 1}\n", r"line 4 \(qparams.minmax\).*alfa"),
    ("version: 1\nsettings:\n  bits: w8a8\n", r"line 3 \(settings.bits\): 'bits' cannot be a setting of a sweep \(use the bits axis\)"),
    ("version: 1\nsettings:\n  proxy_m: 5\n", r"sweep.yaml line 3 \(settings.proxy_m\): unknown setting .proxy_m."),
    ("version: 1\nsuites: [toy-idd]\n", r"line 2 \(suites.0\): unknown suite 'toy-idd'; did you mean 'toy-id'"),
    ("version: 1\nquantizers: [family:PTQ]\n", r"line 2 \(quantizers.0\): no built-in quantizer of family 'PTQ'"),
    ("- just\n- a list\n", r"a sweep file is a mapping"),
    ("version: 1\nqparams: {minmax: {n_calibration: [1, 2]}}\n", r"line 2 \(qparams.minmax\): bad value .* minmax.n_calibration"),
    ("version: 1\nslurm:\n  gpus: two\n", r"line 3 \(slurm.gpus\): slurm.gpus must be a whole number >= 0, got 'two'"),
    ("version: 1\nslurm:\n  time: soon\n", r"line 3 \(slurm.time\): bad slurm.time 'soon'"),
    ("version: 1\nmodels: !!python/object/apply:os.system [echo pwned]\n", r"line 2: not valid YAML"),
])
def test_bad_sweep_files_are_one_line_naming_the_line_or_key(tmp_path, content, expected):
    import re

    message = one_line_error(write(tmp_path, content))
    assert re.search(expected, message), message


def test_a_missing_file_is_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "sweep", "plan", str(tmp_path / "nope.yaml"))
    assert code == 2 and out == "" and err.startswith("qbench: cannot read sweep file") and len(err.strip().splitlines()) == 1


# -- running it --------------------------------------------------------------------------------------
SMALL = """
    version: 1
    name: small
    quantizers: [minmax, smoothquant]
    bits: [w8a8, w4a8]
    suites: [toy-id]
    settings: {limit: 60, proxy_n: 60}
"""


def documents(store: Path) -> dict[str, dict]:
    found = {}
    for path in (store / "documents").glob("*/*.json"):
        document = json.loads(path.read_text())
        found[document["config"]["config_hash"]] = document
    return found


@pytest.fixture(scope="module")
def debug_sweep(tmp_path_factory):
    """The small sweep run once with the debug executor into its own store and cache."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write(folder, SMALL)
    store, cache = folder / "store", folder / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("QBENCH_STORE", str(store))
    mp.setenv("QBENCH_CACHE", str(cache))
    try:
        from qbench.cli import main

        try:
            main(["sweep", "run", str(path), "--executor", "debug"])
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        plan = expanded(path)
    finally:
        mp.undo()
    return path, store, cache, plan, code


def test_debug_run_stores_every_configuration_once(debug_sweep):
    path, store, _, plan, code = debug_sweep
    assert code == 0
    stored = documents(store)
    assert set(stored) == {unit.config_hash for unit in plan.units}  # the configurations and the warm fp32 unit
    assert all(document["verification"]["passed"] for document in stored.values())


def test_every_fp32_image_is_encoded_once_across_the_sweep(debug_sweep):
    _, store, _, plan, _ = debug_sweep
    forwards: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for document in documents(store).values():
        for dataset, counts in document["encoder_calls"]["images_by_dataset"].items():
            forwards[dataset] = forwards.get(dataset, 0) + counts.get("fp32", 0)
        for dataset, info in document["datasets"].items():
            sizes[dataset] = info["num_scored"]
    assert sizes and {dataset: forwards.get(dataset, 0) / size for dataset, size in sizes.items()} == {"toy-id-test": 1.0}
    warm = next(document for document in documents(store).values() if document["config"]["quantizer"] == "fp32")
    assert warm["encoder_calls"]["images"] == {"fp32": 60}  # the fp32 baseline's twin state is not encoded again


def test_status_json_and_a_second_run_submits_nothing(debug_sweep, capsys, monkeypatch):
    path, store, cache, plan, _ = debug_sweep
    monkeypatch.setenv("QBENCH_STORE", str(store))
    monkeypatch.setenv("QBENCH_CACHE", str(cache))
    code, out, err = run_cli(capsys, "sweep", "status", str(path), "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["counts"] == {"done": 4, "running": 0, "failed": 0, "pending": 0}
    assert {unit["state"] for unit in status["units"]} == {"done"}
    code, _, err = run_cli(capsys, "sweep", "run", str(path), "--executor", "debug")
    assert code == 0 and "nothing to submit: 4/4 done" in " ".join(err.split())
    code, out, _ = run_cli(capsys, "results")
    assert code == 0 and all(unit.config_hash in out for unit in plan.configs)  # status indexed what jobs wrote


def test_kept_quantized_models_are_dropped_once_their_configurations_are_stored(debug_sweep):
    _, _, cache, _, _ = debug_sweep
    kept = [entry for entry in (cache / "quantized").iterdir() if entry.is_dir() and entry.name not in ("locks", ".partial")]
    assert kept == []
    assert not any((cache / ".partial").iterdir()) if (cache / ".partial").exists() else True


def test_a_failing_configuration_is_recorded_in_one_line_and_retried_only_on_request(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, """
        version: 1
        quantizers: [minmax]
        suites: [toy-id, cifar10]
        settings: {limit: 60, proxy_n: 60, data_root: DATA}
    """.replace("DATA", str(tmp_path / "no-data")))
    (tmp_path / "no-data").mkdir()
    code, _, err = run_cli(capsys, "sweep", "run", str(path), "--executor", "debug")
    assert code == 1
    code, out, _ = run_cli(capsys, "sweep", "status", str(path), "--json")
    units = {(unit["stage"], tuple(unit["suites"])): unit for unit in json.loads(out)["units"]}
    failed = units[("config", ("cifar10",))]
    assert failed["state"] == "failed" and "cifar-10" in failed["detail"] and "\n" not in failed["detail"]
    assert units[("config", ("toy-id",))]["state"] == "done"
    code, out, _ = run_cli(capsys, "sweep", "status", str(path), "--only", "failed", "--json")
    listed = json.loads(out)
    assert code == 0 and {unit["state"] for unit in listed["units"]} == {"failed"} and listed["counts"]["done"] == 1
    code, _, err = run_cli(capsys, "sweep", "run", str(path), "--executor", "debug")
    assert code == 1 and "--retry-failed" in err  # nothing submitted: the failure is not retried silently
    code, _, err = run_cli(capsys, "sweep", "run", str(path), "--executor", "debug", "--retry-failed")
    assert code == 1 and "cifar-10" in err


def test_local_workers_share_the_units_and_compute_each_once(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, SMALL)
    code, _, err = run_cli(capsys, "sweep", "run", str(path), "--executor", "local", "--max-parallel", "2", "--threads", "1")
    assert code == 0, err
    store = Path(os.environ["QBENCH_STORE"]).with_suffix("")
    stored = documents(store)
    assert len(stored) == 5
    logs = "".join(path.read_text() for path in store.glob("sweeps/*/logs/*/*.err"))
    computed = [line.split()[2] for line in logs.splitlines() if line.endswith("computed") or " computed;" in line]
    assert sorted(computed) == sorted(stored)  # each configuration computed by exactly one worker
    assert {document["provenance"]["threads"]["source"] for document in stored.values()} == {"flag"}
    assert {document["provenance"]["threads"]["torch_threads"] for document in stored.values()} == {1}


# -- SLURM, through the script submitit writes ------------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` and ``srun`` stand-ins on PATH: sbatch keeps each script it is given and answers with a job id."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "sbatch-scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        n=$(ls {scripts} | wc -l)
        cp "$1" {scripts}/script-$n.sh
        echo "Submitted batch job $((4242 + n))"
    """))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_submission_is_two_dependent_arrays_with_the_requested_resources(tmp_path, capsys, fake_slurm):
    path = write(tmp_path, SMALL + "    slurm: {partition: gpu, account: lab}\n")
    code, _, err = run_cli(capsys, "sweep", "run", str(path), "--executor", "slurm", "--max-parallel", "3", "--gpus", "1",
                           "--cpus", "6", "--time", "2:30:00", "--qos", "high", "--units-per-job", "2",
                           "--slurm-setup", "source ~/venv/bin/activate")
    assert code == 0, err
    scripts = sorted(fake_slurm.iterdir())
    assert len(scripts) == 2  # the warm array, then the configuration array
    warm, configs = (script.read_text() for script in scripts)
    assert "#SBATCH --array" not in warm and "#SBATCH --dependency" not in warm  # one warm unit: a plain job
    assert "#SBATCH --array=0-1%2" in configs  # 4 configurations, 2 per task; at most 3 at once
    assert "#SBATCH --dependency=afterany:4242" in configs
    for script in (warm, configs):
        for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=6", "#SBATCH --time=150",
                     "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --requeue",
                     "#SBATCH --signal=USR2@90", "source ~/venv/bin/activate"):
            assert line in script, line
        assert "submitit.core._submit" in script
    assert "submitted 5 unit(s)" in " ".join(err.split())
    records = [json.loads(line) for folder in Path(os.environ["QBENCH_STORE"]).with_suffix("").glob("sweeps/*")
               for line in (folder / "submissions.jsonl").read_text().splitlines()]
    assert records[-1]["executor"] == "slurm" and records[-1]["jobs"] == ["4242", "4243"]


def test_slurm_jobs_write_files_only_and_take_threads_from_the_allocation(monkeypatch, tmp_path):
    """What a SLURM array task runs: index off (many nodes must not write one SQLite file), threads from
    $SLURM_CPUS_PER_TASK."""
    from qbench.engine.sweep_jobs import JobSettings, LineProgress, SweepJob, job_units
    from qbench.engine.threads import choose_threads

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert choose_threads().to_dict() == {"torch_threads": 3, "source": "slurm"}
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    path = write(tmp_path, SMALL)
    unit = expanded(path).configs[0]
    store = tmp_path / "cluster-store"
    summary = SweepJob(job_units([unit]), JobSettings(str(store), index=False, threads=None, executor_threads=None))()
    assert summary["computed"] == [unit.config_hash]
    assert (store / "documents" / unit.config_hash[:2] / f"{unit.config_hash}.json").is_file()
    assert not (store / "index.sqlite").exists()
    document = json.loads((store / "documents" / unit.config_hash[:2] / f"{unit.config_hash}.json").read_text())
    assert document["provenance"]["threads"] == {"torch_threads": 1, "source": "slurm"}
    assert isinstance(LineProgress(), LineProgress)


def test_requeue_resubmits_the_same_units(tmp_path):
    """submitit's checkpointing protocol: on preemption or timeout the job hands back itself with its units."""
    from qbench.engine.sweep_jobs import JobSettings, SweepJob

    from qbench.engine.locks import KeyLock

    held = KeyLock(tmp_path / "locks", "0123456789abcdef")
    assert held.try_acquire()
    job = SweepJob([], JobSettings(str(tmp_path), index=False, threads=None, executor_threads=None))
    delayed = job.checkpoint()
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}
    assert KeyLock(tmp_path / "locks", "0123456789abcdef").try_acquire()  # released for the requeued task


def test_slurm_without_a_cluster_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither srun nor sbatch
    path = write(tmp_path, SMALL)
    code, _, err = run_cli(capsys, "sweep", "run", str(path), "--executor", "slurm")
    assert code == 2 and "--executor slurm needs SLURM" in err and len(err.strip().splitlines()) == 1


def test_sweep_source_points_at_the_deepest_known_key():
    source = SweepSource("f.yaml", {("settings",): 3, ("settings", "limit"): 4})
    assert source.where("settings", "limit") == "f.yaml line 4"
    assert source.where("settings", "other") == "f.yaml line 3"
    assert source.where("nothing") == "f.yaml"


# -- the committed sweep files -----------------------------------------------------------------------
SWEEPS = Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps"


def test_the_study_sweep_is_ten_models_by_sixteen_quantizers_and_shown_in_the_readme():
    study = expanded(SWEEPS / "study.yaml")
    models = {unit.request.model for unit in study.configs}
    quantizers = {unit.request.quantizer for unit in study.configs} - {"fp32"}
    assert len(models) == 10 and all(registry().get("models", name).tier == "core" for name in models)
    assert len(quantizers) == 16
    # 16 methods x 4 bit specs x 2 scopes x 3 seeds, plus the FP32 reference per seed, for 3 suite groups
    assert len(study.configs) == 10 * (16 * 4 * 2 * 3 + 3) * 3
    assert [unit.stage for unit in study.units[:10]] == ["warm"] * 10  # one FP32 warm unit per model, first
    readme = (SWEEPS.parents[1] / "README.md").read_text()
    assert "```yaml\n" + (SWEEPS / "study.yaml").read_text() + "```" in readme


def test_the_toy_study_sweep_plans_offline():
    toy = expanded(SWEEPS / "toy-study.yaml")
    assert len(toy.configs) == 36 and {unit.request.model for unit in toy.units} == {"toy-clip"}
