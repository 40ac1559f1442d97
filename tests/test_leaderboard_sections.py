"""The leaderboard's task-family sections: ID, OOD, robustness and spurious, FP32 → quantized."""

from __future__ import annotations

from pathlib import Path

from qbench.reporting.leaderboard_sections import render_sections, run_rows

REPO = Path(__file__).resolve().parents[1]
STUDY_QUANTIZERS = {"apq-vit", "igq-vit", "minmax", "outlier-suppression", "q-vlm", "quarot", "qwt", "smoothquant",
                    "lsq", "lsq-hybrid", "lsq-pc", "q-vit", "qat-lora", "qat-ste", "qat-ste-hybrid", "rot-lsq"}


def _document(quantizer="minmax", bits="w4a8", model="toy-clip", tuned_accuracy=None):
    records = [
        {"task": "zeroshot", "dataset": "id", "metric": "accuracy", "fp32": 0.9, "quantized": 0.85, "delta": 0.0556},
        {"task": "zeroshot", "dataset": "id", "metric": "nll", "fp32": 0.25, "quantized": 0.3, "delta": -0.2},
        {"task": "ood", "scorer": "msp", "id_dataset": "id", "ood_dataset": "far", "ood_kind": "far",
         "dataset": "far", "metric": "auroc", "fp32": 0.8, "quantized": 0.75, "delta": 0.0625},
        {"task": "robustness", "dataset": "clean", "role": "clean", "metric": "accuracy", "fp32": 0.9, "quantized": 0.85,
         "delta": 0.0556},
        {"task": "robustness", "dataset": "noise", "role": "shifted", "metric": "accuracy", "fp32": 0.5, "quantized": 0.4,
         "delta": 0.2},
        {"task": "spurious", "dataset": "a+b", "metric": "rsg", "fp32": 0.3, "quantized": 0.35, "delta": -0.17},
        {"task": "spurious", "dataset": "a+b", "metric": "v_add", "fp32": None, "quantized": None, "delta": None,
         "value": 0.042},
    ]
    if tuned_accuracy is not None:
        records.append({"task": "zeroshot", "dataset": "id", "metric": "accuracy", "fp32": 0.9,
                        "quantized": tuned_accuracy, "delta": 0.0, "logit_tuned": True})
    return {"config": {"model": model, "quantizer": quantizer, "bits": bits, "scope": "visual",
                       "config_hash": "0123456789abcdef"}, "results": records}


def test_each_family_gets_its_section_with_fp32_to_quantized_cells():
    text = "\n".join(render_sections([_document()]))
    for title in ("## ID: zero-shot", "## OOD detection", "## Robustness to shifts", "## Spurious correlations"):
        assert title in text
    assert "90.00 → 85.00 (-5.00)" in text  # accuracy, Δ = Q − FP32 in pp
    assert "0.250 → 0.300 (+0.050)" in text  # NLL in nats
    assert "80.00 → 75.00 (-5.00)" in text  # AUROC
    assert "| 20.00 |" in text  # δ on the shifted split: (0.5 − 0.4)/0.5
    assert "+4.20" in text  # V_add in pp


def test_a_tuned_run_gets_its_own_row_against_the_same_fp32():
    rows = run_rows([_document(tuned_accuracy=0.88)])
    assert [row.tuned for row in rows] == [False, True]
    text = "\n".join(render_sections([_document(tuned_accuracy=0.88)]))
    assert "minmax (logit-tuned)" in text and "90.00 → 88.00 (-2.00)" in text


def test_strings_from_a_submission_are_escaped():
    text = "\n".join(render_sections([_document(quantizer="<b>x</b>|y", model="[a](b)")]))
    assert "<b>" not in text and "[a](b)" not in text and "&lt;b&gt;x&lt;/b&gt;\\|y" in text


def test_the_committed_leaderboard_shows_every_family_for_the_16_quantizers_at_w8a8_and_w4a8():
    text = (REPO / "leaderboard" / "README.md").read_text()
    for title in ("## ID: zero-shot", "## OOD detection", "## Robustness to shifts", "## Spurious correlations"):
        assert title in text
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[1:3])
            for line in text.split("## Spurious correlations")[1].splitlines() if line.startswith("| toy-clip")}
    assert rows >= {(quantizer, bits) for quantizer in STUDY_QUANTIZERS for bits in ("w8a8", "w4a8")}
    assert "minmax (logit-tuned)" in text
