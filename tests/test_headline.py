"""The headline: every gain against the best model without transfer, chosen on validation (scratch or the
classical baseline), and the report that leads with it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from transferlab.evaluation.comparison import compare_to_baseline, gain_rows
from transferlab.evaluation.stats import paired_bootstrap_gain
from transferlab.reporting.plots import agreement_panels, agreement_png, headline_rows
from transferlab.reporting.report import build_sections, to_html, to_markdown

N_BOOT = 200


def _predictions(y: np.ndarray, accuracy: float, seeds: int, rng: np.random.Generator) -> np.ndarray:
    """(seeds, n) labels, right with probability `accuracy`, else the next class."""
    return np.where(rng.random((seeds, len(y))) < accuracy, y, (y + 1) % 3)


def _train(val: float, converged: bool = True) -> dict:
    return {"converged": converged, "training_failed": False, "best_val_accuracy_mean": val, "lr": 0.01}


def _run(test_acc: dict[str, float], val: dict[str, float], *, converged: dict[str, bool] | None = None) -> tuple:
    """compare_to_baseline on synthetic per-sample predictions: 'raw' is the classical baseline (one seed,
    closed form), 'scratch' the baseline, every other name a transfer strategy (two seeds)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    preds = {n: _predictions(y, a, 1 if n == "raw" else 2, rng) for n, a in test_acc.items()}
    metrics = {
        n: {"test_accuracy": float((p == y).mean()), "balanced_accuracy": 0.0, "macro_f1": 0.0}
        for n, p in preds.items()
    }
    metrics["raw"] |= {"best_val_accuracy_mean": val["raw"], "C": 0.1}
    train = {n: _train(v, (converged or {}).get(n, True)) for n, v in val.items() if n != "raw"}
    summary = compare_to_baseline(
        y, preds, metrics, {**train, "raw": None}, {}, "scratch", classical="raw", n_bootstrap=N_BOOT,
        confidence=0.95, seed=0,
    )  # fmt: skip
    return summary, y, preds


def _direct(y, a, b) -> dict:
    g = paired_bootstrap_gain(y, a, b, metric="accuracy", n_bootstrap=N_BOOT, confidence=0.95, seed=0)
    return {k: round(float(g[k]), 6) for k in ("gain", "ci_low", "ci_high")}


def test_the_classical_baseline_is_the_reference_when_it_beats_scratch_on_validation():
    """Scratch is worse than the baseline on validation: the headline gains are against the baseline, not
    the (flattering) scratch, and equal the bootstrap of the strategy against the baseline's predictions."""
    summary, y, preds = _run({"scratch": 0.55, "raw": 0.75, "lora": 0.8}, {"scratch": 0.6, "raw": 0.74, "lora": 0.82})
    best = summary["best_non_transfer"]
    assert best["name"] == "raw" and best["val_accuracy"] == 0.74
    assert best["candidates"]["scratch"]["val_accuracy"] == 0.6 and "0.740 against scratch's 0.600" in best["reason"]
    lora = summary["strategies"]["lora"]
    vs_best = lora["gain_vs_best_non_transfer"]
    assert vs_best["reference"] == "raw"
    assert {k: vs_best["accuracy"][k] for k in ("gain", "ci_low", "ci_high")} == _direct(y, preds["lora"], preds["raw"])
    # The scratch comparison is kept beside it, and is the larger (flattering) one.
    assert lora["gain_vs_scratch"]["accuracy"]["gain"] > vs_best["accuracy"]["gain"] + 0.1
    assert summary["strategies"]["scratch"]["gain_vs_best_non_transfer"]["verdict"] == "worse"
    assert "gain_vs_best_non_transfer" not in summary["strategies"]["raw"]
    head = summary["headline"]
    assert head["model"] == "lora" and head["recommended"] and head["reference"] == "raw"
    assert head["test_accuracy_gain"]["gain"] == vs_best["accuracy"]["gain"] and "gain_vs_scratch" in head
    rec = summary["recommendation"]
    assert rec["choice"] == "lora" and rec["reference"] == "raw" and rec["transfer_wins"]
    assert "against the best model without transfer (raw, chosen on validation)" in rec["reason"]
    # plots/gain.csv keeps its columns against scratch (dvc.yaml's bar plot) and gains the reference's.
    rows = {r["name"]: r for r in gain_rows(summary)}
    assert set(rows) == {"raw", "lora"}
    assert rows["lora"]["gain"] == lora["gain_vs_scratch"]["accuracy"]["gain"]
    assert rows["lora"]["gain_vs_best_non_transfer"] == vs_best["accuracy"]["gain"]
    assert rows["lora"]["reference"] == "raw" and rows["raw"]["gain_vs_best_non_transfer"] is None
    frame = pd.DataFrame(gain_rows(summary))  # what the report reads back (NaN for the reference's own row)
    drawn = headline_rows(frame.to_dict("records"), set(best["candidates"]))
    assert [r["name"] for r in drawn] == ["lora"] and drawn[0]["gain"] == vs_best["accuracy"]["gain"]


def test_scratch_is_the_reference_when_it_wins_validation():
    summary, y, preds = _run({"scratch": 0.7, "raw": 0.75, "lora": 0.8}, {"scratch": 0.78, "raw": 0.7, "lora": 0.85})
    assert summary["best_non_transfer"]["name"] == "scratch"  # better on test is not what decides
    lora = summary["strategies"]["lora"]
    assert lora["gain_vs_best_non_transfer"]["reference"] == "scratch"
    assert lora["gain_vs_best_non_transfer"]["accuracy"] == lora["gain_vs_scratch"]["accuracy"]
    assert summary["strategies"]["raw"]["gain_vs_best_non_transfer"]["reference"] == "scratch"
    assert "gain_vs_best_non_transfer" not in summary["strategies"]["scratch"]
    assert summary["headline"]["reference"] == "scratch" and "gain_vs_scratch" not in summary["headline"]


def test_an_under_trained_scratch_is_not_the_reference_even_when_it_validates_higher():
    summary, _, _ = _run(
        {"scratch": 0.7, "raw": 0.75, "lora": 0.8},
        {"scratch": 0.8, "raw": 0.7, "lora": 0.85},
        converged={"scratch": False},
    )
    best = summary["best_non_transfer"]
    assert best["name"] == "raw" and not best["candidates"]["scratch"]["trusted"]
    assert "not trusted" in best["reason"]


def test_when_the_classical_baseline_beats_every_strategy_the_recommendation_and_report_say_so():
    summary, y, preds = _run(
        {"scratch": 0.5, "raw": 0.9, "lora": 0.55, "finetune": 0.6},
        {"scratch": 0.6, "raw": 0.8, "lora": 0.7, "finetune": 0.75},
    )
    rec = summary["recommendation"]
    assert rec["choice"] == "raw" and rec["classical_baseline_wins"] and not rec["transfer_wins"]
    assert rec["reference"] == summary["best_non_transfer"]["name"] == "raw"  # the same order decides both
    assert rec["reason"].startswith("use the baseline; transfer does not pay here")
    assert "best transfer model on validation: finetune" in rec["reason"]
    head = summary["headline"]
    assert head["model"] == "finetune" and not head["recommended"] and head["verdict"] == "worse"
    assert head["text"].startswith("Use raw: no transfer strategy beats it on validation")
    assert {k: head["test_accuracy_gain"][k] for k in ("gain", "ci_low", "ci_high")} == _direct(
        y, preds["finetune"], preds["raw"]
    )
    first = _sections(summary)[0]
    assert first[0] == "Recommendation" and first[1].startswith("**Use the baseline; transfer does not pay here.**")
    assert "finetune" in first[1] and "worse beyond noise" in first[1]


def test_when_scratch_beats_every_strategy_transfer_does_not_pay():
    summary, _, _ = _run({"scratch": 0.8, "raw": 0.6, "lora": 0.7}, {"scratch": 0.8, "raw": 0.6, "lora": 0.7})
    rec = summary["recommendation"]
    assert rec["choice"] == "scratch" and not rec["classical_baseline_wins"] and not rec["transfer_wins"]
    assert rec["reason"].startswith("use scratch; transfer does not pay here")
    assert _sections(summary)[0][1].startswith("**Use scratch; transfer does not pay here.**")


def _sections(summary: dict) -> list:
    score = {
        "select_by": "logme",
        "selected": "a",
        "ranking": ["a", "b"],
        "candidates": {"a": {"rank": 1, "logme": 1.0, "hscore": None}, "b": {"rank": 2, "logme": 0.5, "hscore": None}},
    }
    agreement = {"recipes": {}, "candidates": []}
    findings = [
        {"type": "training_failed", "subject": f"{m} (seed {s})", "flagged": False, "severity": "ok"}
        for m in ("lora", "scratch")
        for s in (0, 1)
    ] + [{"type": "overfitting", "subject": "lora", "flagged": True, "severity": "warning", "remedy_result": None}]
    diagnosis = {"findings": findings, "summary": {"worst_severity": "warning", "flagged": 1}}
    data = {"test_samples": 600, "train_samples": 60, "num_classes": 3}
    return build_sections(summary, score, agreement, diagnosis, data, {})


def test_the_report_leads_with_the_recommendation_then_the_headline_figure_then_the_table(tmp_path):
    summary, _, _ = _run({"scratch": 0.55, "raw": 0.75, "lora": 0.8}, {"scratch": 0.6, "raw": 0.74, "lora": 0.82})
    summary["protocol"] = "the protocol"
    sections = _sections(summary)
    title, text, table = sections[0]
    assert title == "Recommendation" and table is None
    gain = summary["headline"]["test_accuracy_gain"]
    assert text.startswith("**Use lora**") and f"**{100 * gain['gain']:+.1f} pp" in text and "over **raw**" in text
    assert "validates at 74.0%, against scratch's 60.0%" in text
    # The table of every model comes second, with both references' columns; the protocol after it.
    assert sections[2][0] == "Protocol"
    header = sections[1][2][0]
    assert header[3].startswith("gain vs raw, best without transfer") and header[5].startswith("gain vs scratch")
    # The estimator undefined for every candidate gets no column; the ok findings one line per check.
    score_table = next(s[2] for s in sections if s[0].startswith("Source candidates"))
    assert "hscore" not in score_table[0] and "logme" in score_table[0]
    diag = next(s[2] for s in sections if s[0] == "Diagnosis")
    assert [r[0] for r in diag[1:]] == ["overfitting", "training failed"] and diag[2][1].startswith("4 ok:")
    assert to_markdown(sections).index("## Recommendation") < to_markdown(sections).index("## Protocol")
    png = tmp_path / "gain_over_best_non_transfer.png"
    png.write_bytes(b"\x89PNG fake")
    page = to_html(sections, [], headline=png)
    assert page.index("<h2>Recommendation</h2>") < page.index('alt="gain_over_best_non_transfer.png"')
    assert page.index('alt="gain_over_best_non_transfer.png"') < page.index("<table>")


def test_an_undefined_estimator_gets_no_panel(tmp_path, monkeypatch):
    from transferlab.reporting import plots

    frame = pd.DataFrame(
        [
            {"recipe": "linear_probe", "estimator": est, "candidate": c, "estimate": v, "test_accuracy": acc}
            for c, acc in (("a", 0.8), ("b", 0.7), ("c", 0.6))
            for est, v in (("logme", acc * 2), ("hscore", np.nan), ("sfda", np.nan), ("leep", -acc))
        ]
    )
    assert agreement_panels(frame) == (["leep", "logme"], ["hscore", "sfda"])
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to look at what was drawn
    agreement_png(frame, tmp_path / "agreement.png")
    (fig,) = figures
    drawn = [ax.get_title() for ax in fig.axes if ax.axison]
    assert drawn == ["leep", "logme"]
    assert all(len(ax.collections) for ax in fig.axes if ax.axison), "every drawn panel has points"
    assert any("hscore, sfda" in t.get_text() for t in fig.texts)
    plots.plt.close("all")


@pytest.mark.parametrize("n_defined", [0, 1])
def test_agreement_figure_with_few_defined_estimators_still_draws(tmp_path, n_defined):
    rows = [
        {"recipe": "linear_probe", "estimator": "hscore", "candidate": c, "estimate": np.nan, "test_accuracy": 0.5}
        for c in "ab"
    ]
    rows += [
        {"recipe": "linear_probe", "estimator": "logme", "candidate": c, "estimate": 1.0, "test_accuracy": 0.5}
        for c in "ab"
    ][: 2 * n_defined]
    assert agreement_png(pd.DataFrame(rows), tmp_path / "a.png").stat().st_size > 0


def test_the_headline_figure_draws_the_transfer_strategies_against_the_reference(tmp_path):
    from transferlab.reporting.figures import report_figures

    summary, _, _ = _run({"scratch": 0.55, "raw": 0.75, "lora": 0.8}, {"scratch": 0.6, "raw": 0.74, "lora": 0.82})
    (tmp_path / "history").mkdir()
    rows = pd.DataFrame(gain_rows(summary)).to_dict("records")
    kw = {"figures": [], "history_dir": tmp_path / "history", "confusion_dir": tmp_path, "out_dir": tmp_path}
    headline, rest = report_figures(summary, ["a", "b", "c"], rows, **kw)
    assert headline.name == "gain_over_best_non_transfer.png" and headline.stat().st_size > 0 and rest == []
    # Only models without transfer: nothing to draw, and no empty figure.
    only = [r for r in rows if r["name"] == "raw"]
    assert report_figures(summary, ["a", "b", "c"], only, **kw)[0] is None
