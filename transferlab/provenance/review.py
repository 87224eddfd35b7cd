"""Pull-request review: what a revision changed against a base, and which changes are beyond noise.

`review()` compares two revisions (the working tree by default, against `main`):

* every metric that changed (the metrics files of dvc.yaml, flattened; the base's from `git show`);
* for each strategy with predictions on both sides, the difference in test accuracy and macro F1 with an
  interval over test samples and training seeds (`evaluation.stats.paired_bootstrap_gain`, paired on
  `sample_id`: the paired test-sample bootstrap plus a Student-t term for the seed-to-seed spread, whose
  one-line description is `StrategyDiff.method`), marked "beyond noise" (the interval excludes zero) or
  "within noise". With one seed on a side the seed-to-seed variance is not estimable: the interval covers
  test samples only and the review says so (`StrategyDiff.seed_variance`). The base's predictions come from
  the DVC cache by the md5 in the base's `dvc.lock`; when they cannot be found, the review says so and that
  strategy falls back to the metrics diff;
* the params that changed (params.yaml, flattened), the stages whose command, deps or params changed
  (dvc.lock) and whether their outputs changed, the strategies added or removed.

`to_markdown()` renders it for a pull-request comment; `regressions()` lists the drops beyond noise.
"""

from __future__ import annotations

import io
import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.provenance import revisions as rv

GAIN_METRICS = ("accuracy", "macro_f1")
MISSING = object()  # a key absent on one side


@dataclass
class MetricChange:
    file: str
    key: str
    old: Any  # MISSING when added
    new: Any  # MISSING when removed

    @property
    def delta(self) -> float | None:
        if _is_number(self.old) and _is_number(self.new):
            return float(self.new) - float(self.old)
        return None


@dataclass
class StrategyDiff:
    """One strategy's test metrics, the revision minus the base."""

    name: str
    source: str  # where the base predictions came from, or why they are missing
    gains: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> paired_bootstrap_gain, rounded
    fallback: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # metric -> (old, new) from metrics files
    method: str = ""  # how the interval is computed (stats.INTERVAL_METHODS), "" without predictions
    seed_variance: str = ""  # how the seeds enter it, in words (A: this revision, B: the base)

    def call(self, metric: str) -> str:
        """'beyond noise (up)' / 'beyond noise (down)' / 'within noise' / 'unknown (no predictions)'."""
        g = self.gains.get(metric)
        if g is None:
            return "unknown (no predictions)"
        if g["ci_low"] > 0:
            return "beyond noise (up)"
        if g["ci_high"] < 0:
            return "beyond noise (down)"
        return "within noise"


@dataclass
class StageChange:
    name: str
    status: str  # added | removed | rerun, outputs changed | rerun, outputs identical
    changed_outs: list[str] = field(default_factory=list)


@dataclass
class Review:
    base: str
    base_commit: str
    rev: str  # 'workspace' or the rev as given
    rev_commit: str
    confidence: float
    n_bootstrap: int
    metric_changes: list[MetricChange] = field(default_factory=list)
    strategies: list[StrategyDiff] = field(default_factory=list)
    params_changed: list[MetricChange] = field(default_factory=list)
    stages: list[StageChange] = field(default_factory=list)
    strategies_added: list[str] = field(default_factory=list)
    strategies_removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Which reproducibility case the two sides are in (`numerics_case`): 'bit-identical', 'statistical' or
    # 'unknown', with each side's numerics fingerprint (core.device.NUMERICS_KEYS, from perf/train/).
    numerics: dict[str, Any] = field(default_factory=dict)

    def regressions(self) -> list[tuple[str, str]]:
        """(strategy, metric) pairs whose drop is beyond noise."""
        return [(s.name, m) for s in self.strategies for m in GAIN_METRICS if s.call(m) == "beyond noise (down)"]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def diff_flat(old: dict[str, Any], new: dict[str, Any], file: str) -> list[MetricChange]:
    """Changed, added and removed keys of two flattened dicts, sorted by key."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, MISSING), new.get(k, MISSING)
        if a != b:
            out.append(MetricChange(file, k, a, b))
    return out


def _load_structured(text: str | None, path: str) -> dict:
    if text is None:
        return {}
    import json

    import yaml

    return json.loads(text) if path.endswith(".json") else (yaml.safe_load(text) or {})


def _prediction_outs(lock: dict[str, rv.LockedStage]) -> dict[str, str]:
    """strategy -> predictions path: the `predictions/<name>.csv` outputs of `evaluate@<name>` stages (and
    any other stage writing the same long format, such as the raw-pixel baseline)."""
    out = {}
    for st in lock.values():
        for path in st.outs:
            if path.startswith("predictions/") and path.endswith(".csv") and posixpath.dirname(path) == "predictions":
                out[posixpath.splitext(posixpath.basename(path))[0]] = path
    return out


def _strategy_names(root: Path, rev: str | None, lock: dict[str, rv.LockedStage]) -> set[str]:
    names = {n.split("@", 1)[1] for n in lock if n.startswith(("train@", "evaluate@"))}
    names |= {posixpath.splitext(posixpath.basename(p))[0] for p in rv.list_files(root, rev, "metrics/eval")}
    return names


def _read_predictions_bytes(data: bytes):
    from transferlab.core.layout import read_predictions

    return read_predictions(io.BytesIO(data))


def review(
    root: str | Path = ".",
    base: str = "main",
    rev: str | None = rv.WORKSPACE,
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Review:
    """Compare revision `rev` (None: the working tree) with `base`.

    Args:
        root: any folder inside the git repository.
        base: the git rev compared against.
        rev: the git rev under review, or None for the working tree.
        n_bootstrap, confidence, seed: the bootstrap of each prediction difference.

    Returns:
        The Review (see the module docstring).

    Raises:
        RevisionError: a revision is unknown or `dvc.lock` unreadable; the message says what to do.
        ValueError: bad bootstrap settings.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 100:
        raise ValueError(f"n_bootstrap must be at least 100 for a percentile interval, got {n_bootstrap}")
    root = rv.repo_root(root)
    base_commit = rv.resolve_commit(root, base)
    if rev is rv.WORKSPACE:
        head = rv.git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False)
        rev_commit = (head or "no commit") + (" + working tree" if head else "")
    else:
        rev_commit = rv.resolve_commit(root, rev)
    out = Review(base, base_commit, rev or "workspace", rev_commit, confidence, n_bootstrap)

    # Metrics: every file dvc.yaml declares on either side, flattened.
    files = sorted(set(rv.dvc_yaml_metrics(root, base)) | set(rv.dvc_yaml_metrics(root, rev)))
    for f in files:
        old = rv.flatten(_load_structured(rv.read_text(root, base, f), f))
        new = rv.flatten(_load_structured(rv.read_text(root, rev, f), f))
        out.metric_changes += diff_flat(old, new, f)

    # Params: params.yaml on both sides.
    old_p = rv.flatten(rv.read_yaml(root, base, "params.yaml") or {})
    new_p = rv.flatten(rv.read_yaml(root, rev, "params.yaml") or {})
    out.params_changed = diff_flat(old_p, new_p, "params.yaml")

    # Stages: dvc.lock entries.
    lock_a, lock_b = rv.read_lock(root, base), rv.read_lock(root, rev)
    if not lock_b:
        out.notes.append(f"{out.rev} has no dvc.lock: run `dvc repro` (or `dvc pull`) before reviewing")
    for name in sorted(set(lock_a) | set(lock_b)):
        a, b = lock_a.get(name), lock_b.get(name)
        if a is None:
            out.stages.append(StageChange(name, "added", sorted(b.outs)))
        elif b is None:
            out.stages.append(StageChange(name, "removed"))
        elif a.fingerprint() != b.fingerprint() or a.outs != b.outs:
            changed = sorted(p for p in set(a.outs) | set(b.outs) if a.outs.get(p) != b.outs.get(p))
            out.stages.append(
                StageChange(name, "rerun, outputs changed" if changed else "rerun, outputs identical", changed)
            )

    out.numerics = numerics_case(_fingerprint(root, base, lock_a), _fingerprint(root, rev, lock_b))

    names_a, names_b = _strategy_names(root, base, lock_a), _strategy_names(root, rev, lock_b)
    out.strategies_added = sorted(names_b - names_a)
    out.strategies_removed = sorted(names_a - names_b)

    # Predictions: each strategy on both sides, paired on sample_id.
    preds_a, preds_b = _prediction_outs(lock_a), _prediction_outs(lock_b)
    for name in sorted(names_a & names_b):
        out.strategies.append(
            _strategy_diff(root, base, rev, name, preds_a.get(name), preds_b.get(name), n_bootstrap, confidence, seed)
        )
    return out


NUMERICS_WORDS = {
    "bit-identical": (
        "Both sides were computed with the same numerics (CPU model, architecture, torch, threads, oneDNN): "
        "a stage whose inputs did not change gives byte-identical outputs, so every change below comes from "
        "the revision."
    ),
    "statistical": (
        "The two sides were computed with different numerics ({diff}): outputs are only statistically the "
        "same (floating point differs between machines and a training run amplifies it like another seed); "
        "a change inside its interval is expected even without a code change, read the intervals, not the "
        "digits."
    ),
    "unknown": (
        "No numerics fingerprint on {side} (perf/train/ missing, or written before fingerprints were "
        "recorded): whether unchanged stages would be byte-identical cannot be said."
    ),
}


def _fingerprint(root: Path, rev: str | None, lock: dict[str, rv.LockedStage]) -> dict[str, Any] | None:
    """The numerics fingerprint a revision's train@ stages recorded in perf/train/<name>.json, or None."""
    from transferlab.core.device import NUMERICS_KEYS

    for path in sorted(p for st in lock.values() for p in st.outs if p.startswith("perf/train/")):
        data, _ = rv.fetch_output(root, rev, path)
        if data is None:
            continue
        info = _load_structured(data.decode(), path)
        if "cpu_model" in info:
            return {k: info.get(k) for k in NUMERICS_KEYS if k in info}
    return None


def numerics_case(base: dict[str, Any] | None, rev: dict[str, Any] | None) -> dict[str, Any]:
    """Which reproducibility case a review is in: 'bit-identical' (equal fingerprints), 'statistical'
    (different) or 'unknown' (a side has none), with the words the review prints."""
    if base is None or rev is None:
        side = "either side" if base is None and rev is None else ("the base" if base is None else "this revision")
        return {"case": "unknown", "base": base, "rev": rev, "words": NUMERICS_WORDS["unknown"].format(side=side)}
    if base == rev:
        return {"case": "bit-identical", "base": base, "rev": rev, "words": NUMERICS_WORDS["bit-identical"]}
    diff = "; ".join(
        f"{k}: {base.get(k)} vs {rev.get(k)}" for k in sorted(set(base) | set(rev)) if base.get(k) != rev.get(k)
    )
    return {"case": "statistical", "base": base, "rev": rev, "words": NUMERICS_WORDS["statistical"].format(diff=diff)}


def _fallback(root: Path, base: str, rev: str | None, name: str) -> dict[str, tuple[Any, Any]]:
    f = f"metrics/eval/{name}.json"
    old = rv.read_json(root, base, f) or {}
    new = rv.read_json(root, rev, f) or {}
    return {m: (old.get(k), new.get(k)) for m, k in (("accuracy", "test_accuracy"), ("macro_f1", "macro_f1"))}


def _strategy_diff(
    root: Path,
    base: str,
    rev: str | None,
    name: str,
    path_a: str | None,
    path_b: str | None,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> StrategyDiff:
    from transferlab.core.layout import aligned_predictions
    from transferlab.evaluation.stats import paired_bootstrap_gain

    if path_a is None or path_b is None:
        return StrategyDiff(
            name, "no predictions output in dvc.lock: metrics diff only", fallback=_fallback(root, base, rev, name)
        )
    data_a, note_a = rv.fetch_output(root, base, path_a)
    data_b, note_b = rv.fetch_output(root, rev, path_b)
    if data_a is None or data_b is None:
        why = note_a if data_a is None else note_b
        return StrategyDiff(name, f"{why}: metrics diff only", fallback=_fallback(root, base, rev, name))
    try:
        df_a, df_b = _read_predictions_bytes(data_a), _read_predictions_bytes(data_b)
        _, y_true, preds = aligned_predictions({"rev": df_b, "base": df_a})
    except ValueError as exc:
        return StrategyDiff(
            name, f"predictions cannot be paired ({exc}): metrics diff only", fallback=_fallback(root, base, rev, name)
        )
    diff = StrategyDiff(name, f"base: {note_a}")
    for metric in GAIN_METRICS:
        g = paired_bootstrap_gain(
            y_true,
            preds["rev"],
            preds["base"],
            metric=metric,
            n_bootstrap=n_bootstrap,
            confidence=confidence,
            seed=seed,
            describe=True,
        )
        diff.method, diff.seed_variance = g.pop("method"), g.pop("seed_variance")
        diff.gains[metric] = {k: v if isinstance(v, bool) else round(float(v), 6) for k, v in g.items()}
    diff.fallback = _fallback(root, base, rev, name)
    return diff


# --- rendering -------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is MISSING:
        return "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _interval_notes(r: Review, bullet: str) -> list[str]:
    """How the intervals were computed, and each strategy whose interval leaves out a model's seed variance."""
    methods = sorted({s.method for s in r.strategies if s.method})
    out = [""] + [f"{bullet}interval: {m}" for m in methods] if methods else []
    for s in r.strategies:
        g = next(iter(s.gains.values()), None)
        if g is not None and not g.get("covers_seed_variance", True):
            out.append(
                f"{bullet}`{s.name}`: {int(g['seeds_a'])} seed(s) here, {int(g['seeds_b'])} at the base: the "
                "seed-to-seed variance of a side with 1 seed is not estimable and is not in its interval"
            )
    return out


def to_markdown(r: Review) -> str:
    """The review as a Markdown pull-request comment."""
    pct = round(r.confidence * 100)
    lines = [f"## transferlab review: `{r.rev}` vs `{r.base}`", ""]
    lines.append(
        f"Base `{r.base}` = `{r.base_commit[:10]}`; under review: `{r.rev_commit[:10]}`"
        + (" (working tree)" if r.rev == "workspace" else "")
        + "."
    )
    regs = r.regressions()
    if r.numerics:
        lines += ["", f"**Reproducibility: {r.numerics['case']}.** {r.numerics['words']}"]
    lines.append("")
    if regs:
        lines.append("**Regression beyond noise:** " + ", ".join(f"{s} {m}" for s, m in regs))
    else:
        lines.append("No drop beyond noise.")
    lines += ["", f"### Test metrics per strategy ({pct}% interval over test samples and seeds)", ""]
    if r.strategies:
        lines += ["| strategy | metric | base | this | change | interval | call |", "|---|---|---|---|---|---|---|"]
        for s in r.strategies:
            for m in GAIN_METRICS:
                old, new = s.fallback.get(m, (None, None))
                g = s.gains.get(m)
                change = (
                    f"{g['gain']:+.4f}" if g else (f"{new - old:+.4f}" if _is_number(old) and _is_number(new) else "—")
                )
                ci = f"[{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]" if g else "—"
                lines.append(f"| {s.name} | {m} | {_fmt(old)} | {_fmt(new)} | {change} | {ci} | {s.call(m)} |")
        missing = [s for s in r.strategies if not s.gains]
        for s in missing:
            lines.append(f"\n- `{s.name}`: {s.source}")
        lines += _interval_notes(r, "- ")
    else:
        lines.append("No strategy is evaluated on both sides.")
    if r.strategies_added or r.strategies_removed:
        lines += ["", "### Strategies", ""]
        lines += [f"- added: `{n}`" for n in r.strategies_added] + [f"- removed: `{n}`" for n in r.strategies_removed]
    lines += ["", "### Params changed", ""]
    if r.params_changed:
        lines += ["| param | base | this |", "|---|---|---|"]
        lines += [f"| `{c.key}` | {_fmt(c.old)} | {_fmt(c.new)} |" for c in r.params_changed]
    else:
        lines.append("None.")
    lines += ["", "### Stages rerun (dvc.lock)", ""]
    if r.stages:
        lines += ["| stage | status | outputs changed |", "|---|---|---|"]
        lines += [f"| `{s.name}` | {s.status} | {', '.join(s.changed_outs) or '—'} |" for s in r.stages]
    else:
        lines.append("None.")
    lines += ["", f"### Metrics changed ({len(r.metric_changes)})", ""]
    if r.metric_changes:
        lines += ["| file | metric | base | this | change |", "|---|---|---|---|---|"]
        for c in r.metric_changes:
            d = c.delta
            lines.append(
                f"| {c.file} | `{c.key}` | {_fmt(c.old)} | {_fmt(c.new)} | {'' if d is None else f'{d:+.6g}'} |"
            )
    else:
        lines.append("None.")
    if r.notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def to_text(r: Review) -> str:
    """The review for a terminal: the calls first, then the counts."""
    pct = round(r.confidence * 100)
    out = [f"review of {r.rev} ({r.rev_commit[:10]}) against {r.base} ({r.base_commit[:10]})", ""]
    if r.numerics:
        out += [f"reproducibility: {r.numerics['case']}. {r.numerics['words']}", ""]
    for s in r.strategies:
        for m in GAIN_METRICS:
            g = s.gains.get(m)
            if g:
                out.append(
                    f"  {s.name:<20} {m:<9} {g['gain']:+.4f}  {pct}% CI [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]  "
                    f"{s.call(m)}"
                )
            else:
                old, new = s.fallback.get(m, (None, None))
                why = f": {s.source}" if m == GAIN_METRICS[0] else ""
                out.append(f"  {s.name:<20} {m:<9} {_fmt(old)} -> {_fmt(new)}  {s.call(m)}{why}")
    out += _interval_notes(r, "  ")
    for n in r.strategies_added:
        out.append(f"  + strategy {n}")
    for n in r.strategies_removed:
        out.append(f"  - strategy {n}")
    out.append("")
    out.append(f"params changed: {len(r.params_changed)}")
    out += [f"  {c.key}: {_fmt(c.old)} -> {_fmt(c.new)}" for c in r.params_changed]
    out.append(f"stages rerun or changed: {len(r.stages)}")
    out += [f"  {s.name}: {s.status}" for s in r.stages]
    out.append(f"metrics changed: {len(r.metric_changes)} (--md for the full table)")
    out += [f"note: {n}" for n in r.notes]
    regs = r.regressions()
    out.append("")
    out.append("REGRESSION beyond noise: " + ", ".join(f"{s} {m}" for s, m in regs) if regs else "no drop beyond noise")
    return "\n".join(out) + "\n"
