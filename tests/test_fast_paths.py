"""Fast paths: validating params and importing a stage module must not import torch, timm, MLflow or
scikit-learn, so that a typo is reported in a fraction of a second. Checked in a fresh interpreter (this
test process has imported torch already); no timing is asserted, only which modules got imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transferlab.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "mlflow", "sklearn", "pandas", "matplotlib", "optuna", "peft")
# Strategy modules whose bodies are edited elsewhere and still import torch at module level.
TORCH_AT_IMPORT: set[str] = set()


def _imported_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter and return the heavy modules it left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bad_params(tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["strategies"]["lora"] = {"rnak": 4}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_params_validation_imports_no_heavy_library(tmp_path):
    bad = _bad_params(tmp_path)
    code = (
        "from transferlab.config import load_params\nfrom transferlab.params import ParamsError\n"
        f"load_params({str(ROOT / 'params.yaml')!r})\n"
        "try:\n"
        f"    load_params({str(bad)!r})\n"
        "    raise SystemExit('the typo was not reported')\n"
        "except ParamsError as exc:\n"
        "    assert 'strategies.lora.rnak' in str(exc), exc\n"
    )
    assert _imported_after(code) == []


@pytest.mark.parametrize("stage", ["prepare", "pretrain", "features", "tune"])
def test_stage_module_imports_no_heavy_library(stage):
    assert _imported_after(f"import stages.{stage}") == []


def test_a_stage_reports_a_params_typo_before_importing_torch(tmp_path):
    bad = _bad_params(tmp_path)
    # features: the stage validates params first, then imports torch for its work.
    args = ["--source", "x", "--prepared", "p", "--out", "o", "--perf", "q", "--params", str(bad)]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stages.features", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "strategies.lora.rnak: unknown key" in proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY)


@pytest.mark.parametrize("name", sorted(STRATEGIES.names()))
def test_strategy_config_needs_no_torch(name):
    if name in TORCH_AT_IMPORT:
        pytest.xfail(f"strategies/{name}.py imports torch at module level (move it into the methods)")
    code = f"from transferlab.strategies import strategy_config\nstrategy_config({name!r}, {{}})"
    assert _imported_after(code) == []


def test_lazy_registry_names_every_module_and_loads_on_demand():
    names = _imported_after(
        "from transferlab.strategies import STRATEGIES\n"
        "assert 'lora' in STRATEGIES and 'nope' not in STRATEGIES\n"
        "import sys; assert 'transferlab.strategies.lora' not in sys.modules"
    )
    assert names == []
    modules = sorted(p.stem for p in (ROOT / "transferlab" / "strategies").glob("*.py") if not p.stem.startswith("_"))
    # strategies/dense.py is the dense tasks' own registry, not a classification strategy
    assert sorted(STRATEGIES) == [m for m in modules if m not in ("base", "dense")]
    assert all(STRATEGIES[n].name == n for n in STRATEGIES)


def test_unknown_strategy_lists_the_valid_names():
    with pytest.raises(KeyError, match=r"unknown strategy 'nope' \(valid: \[.*'lora'"):
        STRATEGIES["nope"]


def test_a_strategy_must_live_in_a_module_of_its_name():
    from transferlab.strategies.base import Strategy, register_strategy

    class Misplaced(Strategy):
        name = "not_its_module"

    Misplaced.__module__ = "transferlab.strategies.lora"
    with pytest.raises(ValueError, match="transferlab/strategies/not_its_module.py"):
        register_strategy(Misplaced)
    assert "not_its_module" not in STRATEGIES


def test_run_main_turns_user_errors_into_one_line(capsys):
    from stages._common import run_main
    from transferlab.params import ParamsError

    def fail() -> None:
        raise ParamsError("bad value")

    with pytest.raises(SystemExit) as exc:
        run_main(fail)
    assert exc.value.code == 1

    def crash() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(crash)
