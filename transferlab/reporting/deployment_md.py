"""`reports/deployment.md`: the deployment study (`stages/deploy.py`, `metrics/deployment.json`) for a person.

It leads with the plain recommendation, then the shift, the predicted and (with labels) measured accuracy per model,
how good the label-free predictors were, and what adaptation did, saying so plainly when it did not help.
"""

from __future__ import annotations

from typing import Any


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ci(d: dict | None, key: str = "value") -> str:
    if not d:
        return "n/a"
    return f"{100 * d[key]:.1f}% [{100 * d['ci_low']:.1f}, {100 * d['ci_high']:.1f}]"


def _pp(d: dict | None) -> str:
    if not d or d.get("ci_low") is None:
        return "n/a"
    return f"{100 * d['gain']:+.1f} pp [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def _num(d: dict) -> str:
    if d.get("ci_low") is None:
        return f"{d['gain']:+.3f}"
    return f"{d['gain']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def _pad(g: dict | None) -> str:
    if not g:
        return "n/a"
    p = g["proxy_a_distance"]
    return f"{p['value']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]"


def _adaptation_words(verdict: str) -> str:
    return {"helps": "helps", "hurts": "hurts", "no clear effect": "does not clearly help"}.get(verdict, verdict)


def _lead(result: dict) -> list[str]:
    rec = result["recommendation"]
    if not rec.get("strategy"):
        return [f"**No recommendation**: {rec.get('why', '')}.", ""]
    what = rec["strategy"] + (
        " with AdaBN (BatchNorm statistics of the deployment images)" if rec["adaptation"] == "adabn" else ""
    )
    line = f"**Deploy {what}**: predicted {_pct(rec['predicted'])} on deployment (ATC, no labels used)"
    if "measured" in rec:
        interval = rec.get("measured_interval")
        line += f", measured {_pct(rec['measured'])}" + (
            f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else ""
        )
        best = rec["best_measured"]
        if rec["regret"] > 0:
            line += (
                f". With the labels, {best['strategy']}"
                + (" with AdaBN" if best["adaptation"] == "adabn" else "")
                + f" would have measured {_pct(best['accuracy'])} ({100 * rec['regret']:.1f} pp more): the label-free "
                "choice is not the best measured one"
            )
        else:
            line += ". The labels confirm it: no other option measured higher"
    return [line + ".", "", f"*Rule*: {result['recommend_rule']}", ""]


def deployment_markdown(result: dict, class_names: list[str]) -> str:
    """The report page (Markdown) of one deployment study."""
    d = result["deployment"]
    s: dict[str, Any] = result["strategies"]
    lines = ["# Deployment study", ""]
    lines += _lead(result)
    if d.get("kind") == "corrupted":
        src = (
            f"built-in: {d['images']} unused images of the target data set ({d['per_class']} per class, never train, "
            f"val or test), "
            + (
                f"each under one of {', '.join(d['corruptions'])} at severity {d['severity']}"
                if d.get("corruptions")
                else "without corruption (the no-shift control)"
            )
        )
    else:
        src = f"folder: {d['images']} images ({d.get('undecodable', 0)} undecodable skipped)"
    lines += [
        f"Deployment images: {src}. Labels: "
        + (
            "present, read only after every prediction, to check."
            if result["labelled"]
            else "none (label-free estimates only)."
        ),
        "",
        "## How far deployment is from the training distribution",
        "",
        "On each model's own penultimate features: held-out in-distribution images (half the test split) against the "
        "deployment images, and against the other half of the test split (the control, which must not be flagged). "
        "PAD = proxy A-distance (0: indistinguishable, 2: separable) with a 95% bootstrap interval; MMD p-value per "
        "seed (permutation test); BN gap = mean standardised distance of the activations from the BatchNorm running "
        "statistics, deployment minus control.",
        "",
        f"*Rule*: {result['shift_rule']}",
        "",
        "| model | PAD deployment | MMD p | shift | PAD control | control | BN gap excess | PAD after AdaBN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s.items():
        sh = r["shift"]
        dep, ctl = sh.get("deploy"), sh.get("control")
        bn = sh.get("bn_gap")
        lines.append(
            f"| {name} | {_pad(dep)} | {', '.join(f'{p:.3f}' for p in dep['mmd_p_values'])} | **{dep['status']}** | "
            f"{_pad(ctl)} | {ctl['status']} | {_num(bn['excess']) if bn else 'n/a'} | {_pad(sh.get('adabn'))} |"
        )
    lines += [
        "",
        "## Accuracy on deployment: predicted without labels" + (", and measured" if result["labelled"] else ""),
        "",
        "ATC (average thresholded confidence, Garg et al. 2022): the threshold on the softmax's negative entropy "
        "is set "
        "on the validation split so that the share of validation images above it equals validation accuracy; the "
        "prediction is the share of deployment images above it (interval: deployment images and seeds; the "
        "threshold's own noise is not in it). AC = average top confidence; DoC = validation accuracy minus the drop "
        "in average confidence.",
        "",
    ]
    head = "| model | test accuracy | ATC | AC | DoC | predicted drop |"
    sep = "|---|---|---|---|---|---|"
    if result["labelled"]:
        head += " measured on deployment | measured drop |"
        sep += "---|---|"
    lines += [head, sep]
    for name, r in s.items():
        lf = r["label_free"]["plain"]
        row = (
            f"| {name}{'' if r.get('converged') is not False else ' (under-trained)'} | {_ci(r['test_accuracy'])} | "
            f"{_ci(lf['atc'])} | {_pct(lf['average_confidence'])} | {_pct(lf['doc'])} | "
            f"{100 * r['predicted_drop']:.1f} pp |"
        )
        if result["labelled"]:
            m = r["measured"]
            drop = m["drop"]
            row += (
                f" {_ci(m['deploy_accuracy'])} | {100 * drop['gain']:.1f} pp "
                f"[{100 * drop['ci_low']:.1f}, {100 * drop['ci_high']:.1f}] |"
            )
        lines.append(row)
    if result["labelled"]:
        pr = result["predictors"]
        mae = pr["mae_mean"]
        lines += [
            "",
            "### How good the label-free predictors were",
            "",
            f"Mean absolute error over every model, seed and adaptation: ATC {100 * mae['atc']:.1f} pp, average "
            f"confidence {100 * mae['average_confidence']:.1f} pp, DoC {100 * mae['doc']:.1f} pp. "
            + (
                "ATC beats average confidence here, so its estimates are worth reading where no labels exist."
                if pr["atc_useful"]
                else "ATC does **not** beat average confidence here: do not trust its estimates on data like these."
            ),
            "",
        ]
        groups = next(iter(s.values()))["measured"]["per_group"]
        if len(groups) > 1:
            lines += ["Per group of deployment images (measured accuracy / ATC estimate, all seeds):", ""]
            lines += ["| model | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
            for name, r in s.items():
                pg = r["measured"]["per_group"]
                lines.append(
                    f"| {name} | "
                    + " | ".join(f"{_pct(pg[g]['accuracy'])} / {_pct(pg[g]['atc'])}" for g in groups)
                    + " |"
                )
            lines.append("")
    lines += ["", "## Adapting to the deployment images", "", "### AdaBN on deployment statistics", ""]
    ada = [(n, r) for n, r in s.items() if "adabn" in r["label_free"]]
    if not ada:
        lines.append("Not measured (deploy.adabn is off, or no model has BatchNorm layers).")
    else:
        head = "| model | ATC before → after | ATC change |"
        sep = "|---|---|---|"
        if result["labelled"]:
            head += " measured before → after | measured change | verdict |"
            sep += "---|---|---|"
        lines += [head, sep]
        for name, r in ada:
            lf = r["label_free"]
            row = (
                f"| {name} | {_pct(lf['plain']['atc']['value'])} → {_pct(lf['adabn']['atc']['value'])} | "
                f"{_pp(lf['adabn_change'])} |"
            )
            if result["labelled"]:
                a = r["measured"]["adabn"]
                row += (
                    f" {_pct(a['before'])} → {_pct(a['after'])} | {_pp(a['change'])} | "
                    f"{_adaptation_words(a['verdict'])} |"
                )
            lines.append(row)
        if result["labelled"]:
            helped = [n for n, r in ada if r["measured"]["adabn"]["verdict"] == "helps"]
            hurt = [n for n, r in ada if r["measured"]["adabn"]["verdict"] == "hurts"]
            lines += [
                "",
                (f"AdaBN helps {', '.join(helped)}" if helped else "AdaBN helps no model beyond noise")
                + (f"; it hurts {', '.join(hurt)}" if hurt else "")
                + ".",
            ]
    lines += ["", "### DANN (domain-adversarial training on the unlabelled deployment images)", ""]
    dv = result.get("dann_vs_finetune_full")
    if dv is None:
        lines.append("Not run (deploy.dann is null, or finetune_full is not among the assessed strategies).")
    else:
        lines.append(
            "Against finetune_full, the same source and recipe without the domain classifier (paired over images, "
            "seeds in the interval):"
        )
        lines += ["", f"- ATC estimate on deployment: {_pp(dv['atc_change'])}"]
        lines.append(f"- test accuracy (in-distribution): {_pp(dv['test']['change'])}")
        if "deploy" in dv:
            lines.append(
                f"- measured deployment accuracy: {_pct(dv['deploy']['before'])} → {_pct(dv['deploy']['after'])}, "
                f"{_pp(dv['deploy']['change'])}: DANN **{_adaptation_words(dv['deploy']['verdict'])}**"
            )
        dsh, fsh = (
            s.get("dann", {}).get("shift", {}).get("deploy"),
            s.get("finetune_full", {}).get("shift", {}).get("deploy"),
        )
        if dsh and fsh:
            lines.append(f"- feature shift (PAD): finetune_full {_pad(fsh)}, DANN {_pad(dsh)}")
        dom = result.get("dann_domain_accuracy") or {}
        if dom:
            per = "; ".join(
                f"seed {k}: {_pct(v['first_epoch'])} at epoch 1, {_pct(v['best_epoch'])} at the kept epoch"
                for k, v in dom.items()
            )
            lines.append(
                f"- the domain classifier's training accuracy (train against deployment images; 50% = fooled): {per}"
            )
    lines.append("")
    return "\n".join(lines)
