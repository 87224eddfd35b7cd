"""What every stage entry point shares: argument parsing, logging, params loading, clean failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from transferlab.params import Params, ParamsError, load_params

log = logging.getLogger("transferlab")


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
    from transferlab.backbones import SourceError
    from transferlab.data import DatasetError
    from transferlab.tracking import TrackingError
    from transferlab.training import DivergenceError

    setup()
    try:
        fn()
    except (ParamsError, DatasetError, SourceError, TrackingError, DivergenceError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        raise SystemExit(1) from None
