"""What every stage entry point shares: argument parsing, logging, params loading, clean failures.

Kept light on purpose: a stage imports this module first, and a typo in params must be reported before
torch, timm or MLflow are imported (seconds each). Stages import their heavy libraries inside `main()`,
after `params_or_exit`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from transferlab.config import load_params
from transferlab.params import Params, ParamsError

log = logging.getLogger("transferlab")

# Errors that mean "the user's input or set-up is wrong": one clear line and exit 1, no traceback.
# (module, class): looked up only in modules already imported, since an exception class whose module was
# never imported cannot have been raised; importing them here would import torch into every stage.
USER_ERRORS = (
    ("transferlab.params", "ParamsError"),
    ("transferlab.data.loaders", "DatasetError"),
    ("transferlab.models.sources", "SourceError"),
    ("transferlab.provenance.tracking", "TrackingError"),
    ("transferlab.training.loop", "DivergenceError"),
    ("transferlab.core.device", "DeviceError"),
    ("transferlab.core.io", "OutputError"),
    ("transferlab.data.tokenize", "TextModelError"),
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The classes of `USER_ERRORS` whose modules are imported."""
    return tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def setup() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    logging.basicConfig(
        level=os.environ.get("TRANSFERLAB_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def params_or_exit(path: str) -> Params:
    try:
        return load_params(path)
    except ParamsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None


def run_main(fn: Callable[[], None]) -> None:
    """Run a stage; known user errors print one clear message and exit 1 instead of a traceback."""
    setup()
    try:
        fn()
    except Exception as exc:
        if not isinstance(exc, user_error_types()):
            raise
        log.error("%s: %s", type(exc).__name__, exc)
        raise SystemExit(1) from None
