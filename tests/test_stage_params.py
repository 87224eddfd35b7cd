"""Every stage declares the params it reads, and no stage imports another stage.

A stage that reads a params key its `params:` list in dvc.yaml does not declare leaves DVC's cache stale:
change that key and `dvc repro` skips the stage, whose outputs no longer match params.yaml. The check runs the
tiny pipeline (tests/tiny_repo.py) with TRANSFERLAB_RECORD_PARAMS set, so that `stages._common.params_or_exit`
hands each stage a view of its params that records every key read (the stage named by DVC's DVC_STAGE), and
compares those keys with the ones dvc.lock records for that stage: DVC's own resolution of `foreach`, `${key}`
and `${item}`.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_repo import ROOT, build, sh

from stages._common import RECORD_ENV, ModelView
from transferlab.config import load_params
from transferlab.params import Params, SourceSpec, TrainParams

# Keys any stage may read undeclared, and why: none of them changes what a stage computes.
UNDECLARED_OK = {
    # Where the MLflow runs go (tracking uri, experiment, timeout): declaring it would rerun every stage when
    # the experiment's name changes, and no output DVC caches depends on it.
    "tracking": "MLflow destination",
}


def covers(declared: str, read: str) -> bool:
    """Whether declaring `declared` (a section, or a dotted key in it) covers reading `read`."""
    return read == declared or read.startswith(declared + ".")


def undeclared_reads(reads: dict[str, set[str]], declared: dict[str, list[str]]) -> dict[str, list[str]]:
    """stage -> the keys it read that neither its declared params nor UNDECLARED_OK cover ("" is the whole
    params file). A stage absent from `declared` declares nothing."""
    allowed = list(UNDECLARED_OK)
    bad = {}
    for stage, keys in sorted(reads.items()):
        ok = [*declared.get(stage, []), *allowed]
        missing = sorted(k for k in keys if not any(covers(d, k) for d in ok))
        if missing:
            bad[stage] = missing
    return bad


def declared_params(lock: dict) -> dict[str, list[str]]:
    """stage -> the params keys dvc.lock records for it (dvc.yaml's `params:`, resolved by DVC)."""
    return {
        name: sorted(key for keys in (stage.get("params") or {}).values() for key in keys)
        for name, stage in lock["stages"].items()
    }


def read_records(path: Path) -> dict[str, set[str]]:
    """stage -> the union of the keys its processes recorded (a stage may load its params more than once)."""
    reads: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["stage"], f"a record without DVC_STAGE: {record['argv']}"
        reads.setdefault(record["stage"], set()).update(record["reads"])
    return reads


def test_checker_flags_undeclared_reads():
    declared = {
        "train@lora": ["seed", "train", "strategies.lora"],
        "features@a": ["sources.a", "train.device"],
        "report": [],
    }
    reads = {
        "train@lora": {"seed", "train.seeds", "strategies.lora", "tracking.uri", "strategies.scratch"},
        "features@a": {"sources.a.kind", "sources.b.kind", "train.device", "train", "train.devices"},
        "report": {"tracking.experiment"},
        "compare": {""},  # model_dump() of the whole params
    }
    assert undeclared_reads(reads, declared) == {
        "compare": [""],
        "features@a": ["sources.b.kind", "train", "train.devices"],
        "train@lora": ["strategies.scratch"],
    }
    assert undeclared_reads({"train@lora": {"seed", "train.epochs"}}, declared) == {}


def test_recording_view_records_each_key_read():
    """The view stands in for the params (isinstance, validation, JSON, pickling) and records at the right grain."""
    import pickle

    from transferlab.core.io import dict_sha256
    from transferlab.strategies import strategy_config

    params = load_params(ROOT / "params.yaml")
    reads: set[str] = set()
    view = ModelView(params, "", reads)
    assert isinstance(view, Params) and isinstance(view.train, TrainParams)
    assert view.train.seeds == params.train.seeds and reads == {"train.seeds"}
    reads.clear()
    assert strategy_config("lora", view.strategies.get("lora")).kind == "lora"
    assert view.sources["efficientnet_lite0"].kind == "packaged" and "nope" not in view.sources
    assert reads == {"strategies.lora", "sources.efficientnet_lite0.kind", "sources.nope"}
    reads.clear()
    assert isinstance(view.sources["efficientnet_lite0"], SourceSpec) and reads == set()
    dict_sha256({"s": view.strategies, "t": view.train.model_dump()})
    assert sorted(view.pretrain) == sorted(params.pretrain)
    assert reads == {"strategies", "train", "pretrain"}
    assert type(pickle.loads(pickle.dumps(view.data))) is type(params.data)
    reads.clear()
    view.tune.model_dump(exclude={"space", "strategies"})
    view.agreement.model_dump(include={"n_bootstrap"})
    assert reads == {f"tune.{f}" for f in type(params.tune).model_fields} - {"tune.space", "tune.strategies"} | {
        "agreement.n_bootstrap"
    }
    with pytest.raises(TypeError, match="read-only"):
        view.seed = 1
    with pytest.raises(TypeError, match="read-only"):
        view.strategies["x"] = {}


def test_params_or_exit_appends_a_record_at_exit(tmp_path):
    record = tmp_path / "reads.jsonl"
    code = "from stages._common import params_or_exit\np = params_or_exit('params.yaml')\np.train.epochs, p.seed"
    env = {**os.environ, RECORD_ENV: str(record), "DVC_STAGE": "train@lora"}
    for _ in range(2):  # appended, not overwritten
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    assert read_records(record) == {"train@lora": {"train.epochs", "seed"}}
    assert len(record.read_text().splitlines()) == 2


STAGE_MODULES = sorted((ROOT / "stages").glob("*.py"))
SHARED = {"stages._common"}  # the one helper every stage imports


def stage_imports(path: Path) -> list[str]:
    """The stage modules `path` imports (anywhere in it, function bodies included), the shared helper left out."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "stages" if node.level else (node.module or "")
            module = f"{base}.{node.module}" if node.level and node.module else base
            names = [module] if module != "stages" else [f"stages.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if (n == "stages" or n.startswith("stages.")) and n not in SHARED]
    return found


def test_stage_import_check_sees_every_form(tmp_path):
    src = tmp_path / "s.py"
    src.write_text(
        "import stages.train\nfrom stages import tune, _common\nfrom stages._common import run_main\n"
        "def f():\n    from stages.evaluate import x\n    from .agreement import y\n    from . import score\n"
    )
    assert stage_imports(src) == ["stages.train", "stages.tune", "stages.evaluate", "stages.agreement", "stages.score"]


@pytest.mark.parametrize("path", STAGE_MODULES, ids=[p.stem for p in STAGE_MODULES])
def test_no_stage_imports_another_stage(path):
    """Shared code lives in the library (or stages._common): a stage importing another runs that stage's code
    without its dvc.yaml deps knowing."""
    assert stage_imports(path) == []


@pytest.mark.slow
def test_every_stage_declares_the_params_it_reads(tmp_path, monkeypatch):
    """The tiny pipeline, with one in-pipeline source to pre-train and one tune@ stage so that every stage runs."""
    repo = build(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"] = {
        "tiny_digits": {
            "dataset": "mnist_digits",
            "arch": "test_resnet",
            "image_size": 16,
            "train_per_class": 2,
            "test_per_class": 2,
            "epochs": 1,
            "batch_size": 8,
        }
    }
    params["tune"].update(
        strategies=["linear_probe"],
        n_trials=1,
        epochs=1,
        pruning=False,
        space={"linear_probe": {"lr": {"low": 0.001, "high": 0.01, "log": True}}},
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    record = tmp_path / "reads.jsonl"
    monkeypatch.setenv(RECORD_ENV, str(record))
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    declared = declared_params(yaml.safe_load((repo / "dvc.lock").read_text()))
    reads = read_records(record)
    assert "tune@linear_probe" in declared and "pretrain" in declared
    # Every stage that ran loaded its params through params_or_exit, so none escaped the recording.
    assert sorted(declared) == sorted(reads)
    assert reads["pretrain"] >= {"pretrain", "seed"}
    bad = undeclared_reads(reads, declared)
    assert not bad, f"stages read params keys their dvc.yaml `params:` do not declare (declare or stop reading): {bad}"
