"""`transferlab review`: three synthetic pull requests in a temporary git repository with a DVC cache.

No pipeline runs: the fixture writes predictions, metrics, a minimal dvc.yaml and a dvc.lock itself, and
puts each predictions file into `.dvc/cache/files/md5/<2>/<30>` as DVC 3 stores it. The branches: one that
really improves lora, one that regresses it, one whose change is noise.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from transferlab import cli
from transferlab.provenance import revisions as rv
from transferlab.provenance.review import review, to_markdown

N, CLASSES, SEEDS = 2000, 3, (0, 1)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def predictions(y: np.ndarray, accuracy: float, seed: int) -> pd.DataFrame:
    """Long-format predictions: per seed, a share `accuracy` of the samples right (which ones: seeded)."""
    rows = []
    for s in SEEDS:
        rng = np.random.default_rng(seed * 10 + s)
        pred = y.copy()
        wrong = rng.choice(N, int(round((1 - accuracy) * N)), replace=False)
        pred[wrong] = (y[wrong] + 1 + rng.integers(0, CLASSES - 1, len(wrong))) % CLASSES
        rows.append(pd.DataFrame({"sample_id": np.arange(N) * 3 + 7, "seed": s, "y_true": y, "y_pred": pred}))
    return pd.concat(rows)


FINGERPRINT = {"device": "cpu", "cpu_model": "AMD EPYC 7B13", "machine": "x86_64", "torch": "2.5.1", "threads": 2}


def write_revision(
    repo: Path, preds: dict[str, pd.DataFrame], params: dict, *, cache: bool = True, fingerprint: dict | None = None
) -> None:
    """Write predictions (+ cache objects), metrics files and a dvc.lock recording their md5s; with a numerics
    `fingerprint`, a train@lora stage whose perf/train/lora.json records it (DVC-cached, as the pipeline's)."""
    stages = {}
    if fingerprint is not None:
        perf = repo / "perf" / "train" / "lora.json"
        perf.parent.mkdir(parents=True, exist_ok=True)
        perf.write_text(json.dumps({"train_seconds_total": 1.0, **fingerprint}))
        md5 = rv.file_md5(perf)
        obj = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(perf.read_bytes())
        stages["train@lora"] = {
            "cmd": "python -m stages.train --strategy lora",
            "outs": [{"path": "perf/train/lora.json", "hash": "md5", "md5": md5}],
        }
    for name, df in preds.items():
        p = repo / "predictions" / f"{name}.csv"
        p.parent.mkdir(exist_ok=True)
        p.write_text(df.to_csv(index=False, lineterminator="\n"))
        md5 = rv.file_md5(p)
        if cache:
            obj = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(p.read_bytes())
        acc = float((df["y_pred"] == df["y_true"]).mean())
        m = repo / "metrics" / "eval" / f"{name}.json"
        m.parent.mkdir(parents=True, exist_ok=True)
        m.write_text(json.dumps({"test_accuracy": round(acc, 6), "macro_f1": round(acc, 6)}, indent=2) + "\n")
        stages[f"evaluate@{name}"] = {
            "cmd": f"python -m stages.evaluate --strategy {name}",
            "deps": [{"path": "stages/evaluate.py", "hash": "md5", "md5": rv.file_md5(repo / "stages/evaluate.py")}],
            "params": {"params.yaml": {f"strategies.{name}": params["strategies"][name]}},
            "outs": [
                {"path": f"metrics/eval/{name}.json", "hash": "md5", "md5": rv.file_md5(m)},
                {"path": f"predictions/{name}.csv", "hash": "md5", "md5": md5},
            ],
        }
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))


@pytest.fixture(scope="module")
def prs(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("review_repo")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / ".gitignore").write_text("/predictions/\n/.dvc/cache/\n/perf/\n")
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/eval\nstages: {}\n")
    (repo / "stages").mkdir()
    (repo / "stages" / "evaluate.py").write_text("# evaluate\n")
    y = np.random.default_rng(0).integers(0, CLASSES, N)
    base_params = {"seed": 42, "strategies": {"scratch": {"lr": 0.003}, "lora": {"rank": 8, "lr": 0.003}}}
    scratch = predictions(y, 0.6, seed=1)
    base_lora = predictions(y, 0.80, seed=2)
    write_revision(repo, {"scratch": scratch, "lora": base_lora}, base_params, fingerprint=FINGERPRINT)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")

    def branch(name: str, lora: pd.DataFrame, rank: int, fingerprint: dict | None = None) -> None:
        git(repo, "checkout", "-q", "-b", name, "main")
        params = json.loads(json.dumps(base_params))
        params["strategies"]["lora"]["rank"] = rank
        write_revision(repo, {"scratch": scratch, "lora": lora}, params, fingerprint=fingerprint)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", name)

    branch("improves", predictions(y, 0.86, seed=3), rank=16, fingerprint=FINGERPRINT)
    branch("regresses", predictions(y, 0.72, seed=4), rank=2)
    # Noise: 2% of lora's predictions redrawn, as a rerun with another nondeterministic kernel might.
    noisy = base_lora.copy()
    rng = np.random.default_rng(5)
    idx = rng.choice(len(noisy), int(0.02 * len(noisy)), replace=False)
    noisy.iloc[idx, noisy.columns.get_loc("y_pred")] = rng.integers(0, CLASSES, len(idx))
    branch("noise", noisy, rank=8, fingerprint={**FINGERPRINT, "cpu_model": "Intel Xeon Platinum 8481C"})
    return repo


def lora(r):
    return next(s for s in r.strategies if s.name == "lora")


def test_real_improvement_is_beyond_noise_up(prs):
    r = review(prs, "main", "improves", n_bootstrap=500)
    s = lora(r)
    assert s.call("accuracy") == "beyond noise (up)" and s.gains["accuracy"]["ci_low"] > 0.03
    assert "DVC cache" in s.source  # the base's predictions came from the cache, by dvc.lock's md5
    assert lora(r).gains["accuracy"]["gain"] == pytest.approx(0.06, abs=0.002)
    assert not r.regressions()
    assert [c.key for c in r.params_changed] == ["strategies.lora.rank"]
    changed = {s.name: s.status for s in r.stages}
    assert changed == {"evaluate@lora": "rerun, outputs changed"}  # scratch's entry is identical
    assert "beyond noise (up)" in to_markdown(r)


def test_regression_is_beyond_noise_down_and_fails(prs):
    r = review(prs, "main", "regresses", n_bootstrap=500)
    assert lora(r).call("accuracy") == "beyond noise (down)"
    assert ("lora", "accuracy") in r.regressions()
    assert next(s for s in r.strategies if s.name == "scratch").call("accuracy") == "within noise"
    assert cli.main(["-C", str(prs), "review", "--rev", "regresses", "--n-bootstrap", "300"]) == 0
    assert (
        cli.main(["-C", str(prs), "review", "--rev", "regresses", "--fail-on-regression", "--n-bootstrap", "300"]) == 1
    )
    assert (
        cli.main(["-C", str(prs), "review", "--rev", "improves", "--fail-on-regression", "--n-bootstrap", "300"]) == 0
    )


def test_noise_is_within_noise(prs, capsys):
    r = review(prs, "main", "noise", n_bootstrap=500)
    s = lora(r)
    assert s.call("accuracy") == "within noise" and s.call("macro_f1") == "within noise"
    assert s.gains["accuracy"]["ci_low"] < 0 < s.gains["accuracy"]["ci_high"]
    # The metrics diff still lists the change; only the interval says it is noise.
    assert any(c.file == "metrics/eval/lora.json" and c.key == "test_accuracy" for c in r.metric_changes)
    assert (
        cli.main(["-C", str(prs), "review", "--rev", "noise", "--md", "--fail-on-regression", "--n-bootstrap", "300"])
        == 0
    )
    md = capsys.readouterr().out
    assert md.startswith("## transferlab review") and "| lora | accuracy |" in md and "within noise" in md


def test_working_tree_is_reviewed_from_disk(prs):
    git(prs, "checkout", "-q", "noise")  # predictions on disk are the last branch written: noise
    r = review(prs, "main", None, n_bootstrap=300)
    assert r.rev == "workspace" and lora(r).call("accuracy") == "within noise"


def test_missing_base_predictions_fall_back_to_the_metrics_diff(prs, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(prs), str(clone)], check=True)
    git(clone, "branch", "-q", "improves", "origin/improves")
    r = review(clone, "origin/main", "improves", n_bootstrap=300)  # a fresh clone: no DVC cache
    s = lora(r)
    assert s.call("accuracy") == "unknown (no predictions)" and "metrics diff only" in s.source
    assert s.fallback["accuracy"][1] > s.fallback["accuracy"][0]
    assert not r.regressions()


def test_usage_errors_exit_2(prs, capsys):
    assert cli.main(["-C", str(prs), "review", "--base", "no-such-branch"]) == 2
    assert "fetch-depth" in capsys.readouterr().err
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["review", "--confidence"])
    assert exc.value.code == 2


def test_review_says_which_reproducibility_case_it_is_in(prs):
    """Same numerics fingerprint: bit-identical; another CPU model: only statistically the same, and the
    review names what differs; a side without one: unknown. The markdown carries the case."""
    same = review(prs, base="main", rev="improves", n_bootstrap=200)
    assert same.numerics["case"] == "bit-identical"
    other = review(prs, base="main", rev="noise", n_bootstrap=200)
    assert other.numerics["case"] == "statistical"
    assert "cpu_model: AMD EPYC 7B13 vs Intel Xeon Platinum 8481C" in other.numerics["words"]
    assert "Reproducibility: statistical" in to_markdown(other)
    none = review(prs, base="main", rev="regresses", n_bootstrap=200)
    assert none.numerics["case"] == "unknown" and "this revision" in none.numerics["words"]
