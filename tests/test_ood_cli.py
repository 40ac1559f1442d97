"""OOD detection from the command line: record shape, several suites in one run, scorer options,
skipped scorers, and ``qbench envision``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_runner import run_cli

LIMIT = "200"
ALL_SCORERS = ("msp", "energy", "entropy", "mcm", "neglabel", "eoe", "generic-negative")




@pytest.fixture(scope="module")
def two_suites(tmp_path_factory):
    """toy-id and toy-ood in one run with every registered scorer: the JSON on stdout of a real process."""
    folder = tmp_path_factory.mktemp("ood-cli")
    result = subprocess.run(
        [sys.executable, "-m", "qbench", "eval", "--suite", "toy-id", "--suite", "toy-ood", "--limit", LIMIT, "--proxy-n", "100", "--json", "--store", str(folder / "s.sqlite"),
         "--cache-dir", str(folder / "features")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_ood_records_carry_scorer_pair_and_metric(two_suites):
    ood = [record for record in two_suites["results"] if record.get("task") == "ood"]
    keys = {(r["scorer"], r["id_dataset"], r["ood_dataset"], r["metric"]) for r in ood}
    expected = {(scorer, "toy-id-test", ood_set, metric)
                for scorer in ALL_SCORERS for ood_set in ("toy-ood-near", "toy-ood-far")
                for metric in ("auroc", "fpr95", "aupr_in", "aupr_out")}
    assert keys == expected and len(ood) == len(expected)
    for record in ood:
        assert 0.0 <= record["fp32"] <= 1.0 and 0.0 <= record["quantized"] <= 1.0
        assert record["diff"] == pytest.approx(record["quantized"] - record["fp32"])
        assert record["ood_kind"] == ("near" if record["ood_dataset"] == "toy-ood-near" else "far")


def test_several_suites_share_one_encoding(two_suites):
    zero_shot = [r for r in two_suites["results"] if r.get("task") == "zeroshot"]
    assert {r["suite"] for r in zero_shot} == {"toy-id", "toy-ood"}
    assert [s["name"] for s in two_suites["config"]["suites"]] == ["toy-id", "toy-ood"]
    calls = two_suites["encoder_calls"]["images"]
    assert calls == {"fp32": 3 * int(LIMIT), "quantized": 3 * int(LIMIT)}  # toy-id-test once, not once per suite


def test_scorer_settings_enter_the_config(two_suites):
    assert set(two_suites["config"]["scorers"]) == set(ALL_SCORERS) and two_suites["skipped"] == []
    assert two_suites["config"]["scorers"]["mcm"] == {"temperature": 1.0, "prompt_mode": "ensemble"}
    assert two_suites["config"]["limit"] == int(LIMIT)


def test_mcm_separates_the_toy_near_ood_pair(two_suites):
    auroc = next(r for r in two_suites["results"]
                 if r.get("scorer") == "mcm" and r["ood_dataset"] == "toy-ood-near" and r["metric"] == "auroc")
    assert auroc["fp32"] > 0.55


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--scorer", "msq", "--suite", "toy-ood"], "unknown scorer 'msq'; did you mean 'msp'"),
        (["--sparam", "mcm.tau=2", "--suite", "toy-ood", "--scorer", "mcm"], "scorer 'mcm' has no parameter 'tau'"),
        (["--sparam", "mcm=2", "--suite", "toy-ood"], "use SCORER.NAME=VALUE"),
        (["--sparam", "energy.temperature=2", "--suite", "toy-ood", "--scorer", "mcm"], "does not run in this evaluation"),
        (["--scorer", "mcm"], "no selected suite has an OOD task"),
        (["--limit", "0"], "bad --limit 0"),
        (["--eoe-labels", "/no/such/labels.json", "--suite", "toy-ood"], "does not exist"),
    ],
)
def test_bad_scorer_input_is_one_line(capsys, args, expected):
    code, out, err = run_cli(capsys, "eval", *args)
    assert code == 2 and out == ""
    assert err.startswith("qbench: ") and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_scorer_parameters_from_the_command_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", "--suite", "toy-ood", "--scorer", "energy", "--sparam",
                             "energy.temperature=2.5", "--limit", "50", "--proxy-n", "50", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["config"]["scorers"]["energy"]["temperature"] == 2.5


def test_offline_substitutes_are_named_in_the_provenance(two_suites):
    eoe = next(iter(two_suites["scorers"]["eoe"]["plans"].values()))
    assert "offline substitute" in eoe["source"]
    neglabel = next(iter(two_suites["scorers"]["neglabel"]["plans"].values()))
    assert "not the paper" in json.dumps(neglabel).lower() or "rebuild" in json.dumps(neglabel).lower()


def test_eoe_without_labels_is_skipped_by_default_and_an_error_when_asked_for(capsys, monkeypatch, tmp_path):
    import qbench_plugins.toyworld.plugin as toy
    from qbench import cli

    monkeypatch.setattr(toy, "envisioned", type("NoShippedLabels", (), {"EOE_LABELS": None}))
    cli.registry.cache_clear()
    try:
        lexicon = tmp_path / "words.txt"
        lexicon.write_text("\n".join(f"word{i}" for i in range(1000)))  # keeps NegLabel's mining small
        common = ("eval", "--suite", "toy-ood", "--limit", "50", "--proxy-n", "50", "--neglabel-lexicon", str(lexicon))
        code, out, err = run_cli(capsys, *common, "--scorer", "msp", "--scorer", "eoe", "--json")
        assert code == 2 and "--scorer eoe: no envisioned labels for toy-ood" in err and out == ""
        code, out, err = run_cli(capsys, *common, "--json")  # every registered scorer: eoe skips itself
        assert code == 0, err
        document = json.loads(out)
        assert {item["scorer"] for item in document["skipped"]} == {"eoe"}
        ran = {record.get("scorer") for record in document["results"]} - {None}
        assert ran == set(ALL_SCORERS) - {"eoe"}
    finally:
        cli.registry.cache_clear()


def test_envision_prints_the_prompt_and_parses_a_reply(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "envision", "toy-ood", "--task", "near")
    assert code == 0 and "circle" in out and "arrow" in out
    reply = tmp_path / "reply.txt"
    reply.write_text("circle:\n- coin\n- wheel\nsquare:\n- window\n")
    target = tmp_path / "labels" / "eoe" / "toy-ood.json"
    code, _, err = run_cli(capsys, "envision", "toy-ood", "--task", "near", "--reply", str(reply), "--out", str(target))
    assert code == 0, err
    written = json.loads(target.read_text())
    assert written["circle"] == ["coin", "wheel"] and written["square"] == ["window"]
    assert "parsed from an LLM reply" in written["_provenance"]["source"]


# -- scorer resources and plugin commands come from plugins --------------------------------------------
import importlib.metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from qbench.hookspecs import hookimpl  # noqa: E402
from qbench.scoring import ResourceOption, Scorer, ScorerPlan, ScorerSkipped  # noqa: E402


class PromptFileScorer(Scorer):
    """A third-party scorer that reads a user file: ID cosine minus the cosine to the user's prompts."""

    name = "prompt-file"
    citation = "qbench test scorer"
    summary = "max ID cosine - max cosine to the user's prompts"
    resources = (ResourceOption("my_prompts", "file", "Prompts, one per line.", flag="--my-prompts"),
                 ResourceOption("my_model", "value", "A model id, recorded in provenance."))

    def plan(self, context):
        path = context.resources.path("my_prompts")
        if path is None:
            raise ScorerSkipped("no --my-prompts file")
        prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        return ScorerPlan(text_sets={"my_prompts": prompts},
                          provenance={"prompts": len(prompts), "model": context.resources.get("my_model")})

    def score(self, inputs, prepared=None):
        return inputs.cosines().max(axis=1) - inputs.cosines(inputs.text.get("my_prompts", self.name)).max(axis=1)


class PromptFilePlugin:
    qbench_distribution = ("qbench-test-prompt-file", "0.1")

    @hookimpl
    def qbench_register_scorers(self):
        return [PromptFileScorer]


@pytest.fixture
def third_party(monkeypatch):
    """The CLI's registry: the built-ins plus a package whose scorer declares two resources."""
    from qbench import cli
    from qbench.plugins import get_plugin_manager
    from qbench.registry import build_registry

    registry = build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=(PromptFilePlugin(),)))
    monkeypatch.setattr(cli, "registry", lambda: registry)
    return registry


def test_builtin_scorer_flags_are_declared_by_the_scorers_not_the_core():
    from qbench import cli

    assert not {"neglabel_lexicon", "eoe_labels", "generic_prompts"} & {param.name for param in cli.eval_command.params}
    flags = {option.opts[0]: option.name for option in cli.scorer_resource_options()}
    assert flags == {"--neglabel-lexicon": "neglabel_lexicon", "--neglabel-wordnet": "neglabel_wordnet",
                     "--eoe-labels": "eoe_labels", "--labels-dir": "labels_dir", "--generic-prompts": "generic_prompts",
                     "--eoe-llm": "eoe_llm"}


def test_eval_help_lists_the_resource_options(capsys):
    code, out, _ = run_cli(capsys, "eval", "--help")
    assert code == 0
    for flag in ("--resource KEY=VALUE", "--neglabel-lexicon", "--eoe-labels", "--labels-dir", "--generic-prompts",
                 "--eoe-llm", "--neglabel-wordnet"):
        assert flag in out
    flat = " ".join(out.split())
    assert "[default: toy-clip]" in flat and "[default: minmax]" in flat  # the built-in plugins' defaults


def test_a_third_party_scorer_declares_a_flag_and_resources(third_party, capsys):
    code, out, _ = run_cli(capsys, "eval", "--help")
    assert code == 0 and "--my-prompts" in out and "Prompts, one per line." in out


def test_resource_values_reach_the_config_under_their_keys(third_party, tmp_path):
    from qbench import cli
    from qbench.engine.evaluate import resolve

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of nothing\nan empty picture\n")
    by_flag = cli.eval_base_request(cli.eval_options_from_settings(
        {"suites": ["toy-ood"], "scorers": ["prompt-file"], "my_prompts": str(prompts), "resource": ["my_model=org/m"]},
        "test"))
    by_mapping = cli.eval_base_request(cli.eval_options_from_settings(
        {"suites": ["toy-ood"], "scorers": ["prompt-file"], "resources": {"my_prompts": str(prompts), "my_model": "org/m"}},
        "test"))
    assert dict(by_flag.resources) == dict(by_mapping.resources) == {"my_prompts": prompts, "my_model": "org/m"}
    config = resolve(by_flag, third_party).config
    assert set(config["scorer_resources"]) == {"my_prompts", "my_model"} and config["scorer_resources"]["my_model"] == "org/m"
    prompts.write_text("something else\n")
    assert resolve(by_flag, third_party).config["config_hash"] != config["config_hash"]


def test_builtin_flags_and_the_generic_option_are_the_same_resource(tmp_path):
    from qbench import cli

    labels = tmp_path / "labels.txt"
    labels.write_text("kite\n")
    flag = cli.eval_base_request(cli.eval_options_from_settings({"suites": ["toy-ood"], "eoe_labels": str(labels)}, "t"))
    generic = cli.eval_base_request(cli.eval_options_from_settings({"suites": ["toy-ood"], "resource": [f"eoe_labels={labels}"]}, "t"))
    assert flag.resources == generic.resources and dict(flag.resources) == {"eoe_labels": labels}


@pytest.mark.parametrize("args, expected", [
    (["--resource", "eoe_label=x.json"], "unknown scorer resource 'eoe_label'; did you mean 'eoe_labels'"),
    (["--resource", "eoe_labels"], "bad --resource 'eoe_labels': use KEY=VALUE"),
    (["--eoe-labels", "a.json", "--resource", "eoe_labels=b.json"], "given twice"),
])
def test_bad_resources_are_one_line(capsys, args, expected):
    code, out, err = run_cli(capsys, "eval", "--suite", "toy-ood", *args)
    assert code == 2 and out == "" and expected in err and len(err.strip().splitlines()) == 1


def test_a_third_party_scorer_reads_its_file_in_a_real_run(third_party, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of nothing\nan empty picture\n")
    code, out, err = run_cli(capsys, "eval", "--suite", "toy-ood", "--scorer", "prompt-file", "--my-prompts", str(prompts),
                             "--resource", "my_model=org/m", "--limit", "50", "--proxy-n", "50", "--json")
    assert code == 0, err
    document = json.loads(out)
    plan = next(iter(document["scorers"]["prompt-file"]["plans"].values()))
    assert plan == {"prompts": 2, "model": "org/m"}
    assert document["config"]["scorer_resources"]["my_model"] == "org/m"
    aurocs = [r for r in document["results"] if r.get("scorer") == "prompt-file" and r["metric"] == "auroc"]
    assert len(aurocs) == 2 and all(np.isfinite(r["fp32"]) for r in aurocs)


def test_envision_is_a_command_of_the_eoe_plugin(capsys):
    from qbench import cli

    assert "envision" not in cli.cli.commands  # the core defines no such command
    command = cli.plugin_commands()["envision"]
    assert command.callback.__module__ == "qbench_plugins.scorers.eoe_envision"
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "envision" in out and "EOE envisioned outlier labels" in out


def test_top_level_help_imports_no_heavy_plugin():
    if importlib.metadata.entry_points(group="qbench"):
        pytest.skip("a third-party qbench plugin is installed: --help then asks every plugin for its commands")
    code = ("import sys; from qbench.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'qbench_plugins.quantizers.minmax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "envision" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


class CommandPlugin:
    qbench_distribution = ("qbench-test-commands", "0.1")

    @hookimpl
    def qbench_register_commands(self):
        import click

        @click.command("hello")
        def hello():
            """Say hello."""
            click.echo("hello from a plugin")

        @click.command("eval")
        def shadow():
            """Shadows a core command."""

        return [hello, shadow, "not a command"]


def test_plugin_commands_run_and_bad_ones_are_skipped_with_a_warning(monkeypatch, capsys):
    import click
    import pluggy

    from qbench import cli, hookspecs

    def manager():
        plugins = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        plugins.add_hookspecs(hookspecs)
        plugins.register(importlib.import_module("qbench_plugins.scorers.eoe_envision"), name="builtin:eoe")
        plugins.register(CommandPlugin(), name="commands-plugin")
        return plugins

    monkeypatch.setattr(cli, "_command_manager", manager)
    cli.plugin_commands.cache_clear()
    try:
        code, out, err = run_cli(capsys, "hello")
        assert code == 0 and out == "hello from a plugin\n"
        assert "command 'eval' is a built-in qbench command; skipped" in err
        assert "not a named click.Command" in err
        assert set(cli.plugin_commands()) == {"envision", "hello"}  # the shadowing 'eval' was not added
        assert cli.cli.get_command(click.Context(cli.cli), "eval").callback.__module__ == "qbench.cli"
    finally:
        cli.plugin_commands.cache_clear()
