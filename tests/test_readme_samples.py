"""The README's sample outputs are what the tool prints: ``scripts/readme_samples.py`` regenerates them from a
fresh run of the quick-start command, and this test runs it and compares (issue 14, item 8)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def samples_module():
    """``scripts/readme_samples.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("readme_samples", REPO / "scripts" / "readme_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_samples_are_what_the_quick_start_command_prints():
    module = samples_module()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    fresh = module.samples()
    updated, stale = module.updated_readme(readme, fresh)
    assert stale == [], f"README samples {stale} are stale: run 'python scripts/readme_samples.py'"
    assert updated == readme
    console = fresh["quickstart-console"]
    hash_line = re.search(r"config ([0-9a-f]{16})", console)
    assert hash_line and f'"config_hash": "{hash_line[1]}"' in fresh["eval-json"]  # one run, both samples


def test_the_json_sample_keeps_stable_fields_and_hides_run_specific_ones():
    module = samples_module()
    document = {
        "timing": {"total_s": 7.4}, "provenance": {"created_at": "2025-01-01", "torch_version": "2.x"},
        "config": {"model": "toy-clip", "config_hash": "0123456789abcdef", "limit": None, "device": "cpu"},
        "results": [{"metric": "accuracy", "fp32": 0.9330000000000001}, {"metric": "ece"}],
        "verification": {"passed": True, "n_modules": 2, "modules": [{"name": "a"}, {"name": "b"}], "other": 1},
        "zeta": [1, 2, 3],
    }
    sample = module.json_sample_document(document)
    assert list(sample) == ["config", "verification", "results", "zeta", "provenance", "timing"]
    assert sample["config"] == {"model": "toy-clip", "limit": None, "config_hash": "0123456789abcdef", "...": "..."}
    assert sample["results"] == [{"metric": "accuracy", "fp32": 0.933}, "..."]
    assert sample["verification"] == {"passed": True, "n_modules": 2, "modules": [{"name": "a"}, "..."]}
    assert sample["timing"] == {"total_s": "..."} and sample["provenance"]["created_at"] == "..."
    assert sample["zeta"] == "..."
    text = module.render_json(sample)
    assert json.loads(text) == sample and max(len(line) for line in text.splitlines()) <= module.WIDTH


def test_updating_is_idempotent_and_needs_every_marker():
    module = samples_module()
    fresh = {"quickstart-console": "```\nnew\n```\n", "eval-json": "```json\n{}\n```\n"}
    text = ("a\n<!-- qbench-sample:quickstart-console -->\n```\nold\n```\n<!-- /qbench-sample:quickstart-console -->\n"
            "b\n<!-- qbench-sample:eval-json -->\n```json\n{}\n```\n<!-- /qbench-sample:eval-json -->\n")
    once, stale = module.updated_readme(text, fresh)
    assert stale == ["quickstart-console"] and "new" in once and "old" not in once
    assert module.updated_readme(once, fresh) == (once, [])
    try:
        module.updated_readme("no markers", fresh)
    except SystemExit as error:
        assert "lacks the sample marker" in str(error)
    else:
        raise AssertionError("a README without markers must be an error")
