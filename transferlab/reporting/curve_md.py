"""The label-budget sweep for people: reports/curve.md (the answers in words first), plots/curve.png (accuracy
against labels per class on a log axis: points with intervals, fitted curves where they hold, the crossovers
marked) and the rows of plots/curve.csv (dvc plots). Reads only `evaluation.curve.analyse_curve`'s dict."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Z95 = 1.96


def _models(result: dict) -> list[str]:
    return [*result["strategies"], result["classical"]]


def curve_csv_rows(result: dict) -> list[dict]:
    """One row per (model, budget): labels_per_class, name, test_accuracy and its +-1.96 SE band."""
    rows = []
    for m in _models(result):
        for b in result["budgets"]:
            pt = result["points"][m][str(b)]
            rows.append(
                {
                    "labels_per_class": b,
                    "name": m,
                    "test_accuracy": pt["test_accuracy"],
                    "ci_low": round(pt["test_accuracy"] - Z95 * pt["test_accuracy_se"], 6),
                    "ci_high": round(pt["test_accuracy"] + Z95 * pt["test_accuracy_se"], 6),
                }
            )
    return rows


def curve_png(result: dict, path: str | Path) -> Path:
    """Accuracy against labels per class (log x): measured points with 95% bars, the fitted curves that hold
    (dashed beyond the largest budget, up to the extrapolation limit), vertical marks at the crossovers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    budgets = result["budgets"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid_in = np.geomspace(budgets[0], budgets[-1], 100)
    grid_out = np.geomspace(budgets[-1], result["extrapolation_limit"], 50)
    for i, m in enumerate(_models(result)):
        color = f"C{i}"
        acc = [result["points"][m][str(b)]["test_accuracy"] for b in budgets]
        err = [Z95 * result["points"][m][str(b)]["test_accuracy_se"] for b in budgets]
        ax.errorbar(budgets, acc, yerr=err, fmt="o", color=color, capsize=3, label=m)
        fit = result["fits"][m]
        if fit.get("holds"):
            a, b_, c = fit["a"], fit["b"], fit["c"]
            ax.plot(grid_in, 1 - (a * grid_in**-b_ + c), "-", color=color, lw=1)
            ax.plot(grid_out, 1 - (a * grid_out**-b_ + c), "--", color=color, lw=1, alpha=0.6)
    for ref, key in (("scratch", "crossover_vs_scratch"), ("classical", "crossover_vs_classical")):
        for s, ans in result.get(key, {}).items():
            v = ans.get("value")
            if isinstance(v, int | float) and math.isfinite(v):
                ax.axvline(v, color="grey", ls=":", lw=1)
                ax.text(v, ax.get_ylim()[0], f" {ref} = {s}\n at {v:.0f}", fontsize=7, rotation=90, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("labels per class (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Learning curves: test accuracy against labels per class")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _end(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.0f}"


def _cell(ans: dict) -> str:
    """A value with its interval ("82 [40, 150]"), or the words that stand for it."""
    v = ans.get("value")
    if isinstance(v, int | float):
        return f"{v:.0f} [{_end(ans['ci_low'])}, {_end(ans['ci_high'])}]"
    return str(v)


def curve_markdown(result: dict) -> str:
    """reports/curve.md: the answers in words, then the tables (points, gains, effective data, fits)."""
    budgets = result["budgets"]
    lines = ["# Label budgets: is transfer worth labelling more?", ""]
    lines += [f"- {h}" for h in result["headline"]] or ["- (no transfer strategy in the sweep)"]
    lines += [
        "",
        f"Budgets measured: {budgets} labels per class; test split fixed ({result['test_samples']} images). "
        f"Nothing is read beyond {result['extrapolation_factor']:g}x the largest budget "
        f"({result['extrapolation_limit']:g} per class).",
        "",
        "## Test accuracy (mean over seeds, +-1.96 SE; * under-trained: a seed did not converge)",
        "",
        "| model | " + " | ".join(str(b) for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for m in _models(result):
        cells = []
        for b in budgets:
            pt = result["points"][m][str(b)]
            mark = "*" if pt.get("converged") is False else ""
            cells.append(f"{pt['test_accuracy']:.3f}{mark} +-{Z95 * pt['test_accuracy_se']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for title, key in (("Gain vs scratch", "gain_vs_scratch"), ("Gain vs the classical baseline", "gain_vs_classical")):
        if not result.get(key):
            continue
        lines += [
            "",
            f"## {title} (accuracy points, interval)",
            "",
            "| strategy | " + " | ".join(map(str, budgets)) + " |",
        ]
        lines.append("|---|" + "---|" * len(budgets))
        for s, by_b in result[key].items():
            cells = [
                f"{100 * g['gain']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]" for g in by_b.values()
            ]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if result["effective_data_transferred"]:
        lines += ["", "## Effective data transferred (labels per class scratch would need beyond those used)", ""]
        lines += ["| strategy | " + " | ".join(map(str, budgets)) + " |", "|---|" + "---|" * len(budgets)]
        for s, by_b in result["effective_data_transferred"].items():
            lines.append(f"| {s} | " + " | ".join(_cell(a) for a in by_b.values()) + " |")
    lines += ["", "## Crossovers and labels needed", ""]
    for key, words in (("crossover_vs_scratch", "scratch matches"), ("crossover_vs_classical", "classical matches")):
        for s, ans in result.get(key, {}).items():
            lines.append(f"- {words} {s}: {_cell(ans)}")
    t = result["target_accuracy"]
    lines.append(f"- target accuracy {t['value']:.4f} ({t['rule']}):")
    for m, ans in result["labels_needed"].items():
        lines.append(f"  - {m}: {_cell(ans)} labels per class")
    lines += ["", "## Fits", "", f"Model: {result['model']}. Rule: {result['fit_rule']}.", ""]
    for m, fit in result["fits"].items():
        params = f"a={fit['a']:.3g}, b={fit['b']:.3g}, c={fit['c']:.3g}: " if "a" in fit else ""
        lines.append(f"- {m}: {params}{fit['status']}")
    lines += ["", f"Intervals: {result['interval']}.", ""]
    return "\n".join(lines)
