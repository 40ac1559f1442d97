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
