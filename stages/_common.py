"""What every stage entry point shares: argument parsing, logging, params loading, clean failures.

Kept light on purpose: a stage imports this module first, and a typo in params must be reported before
torch, timm or MLflow are imported (seconds each). Stages import their heavy libraries inside `main()`,
after `params_or_exit`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

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
    ("transferlab.data.coco", "CocoError"),
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
    """The validated params, or exit 2 with the problems listed.

    With TRANSFERLAB_RECORD_PARAMS=<file> set (tests/test_stage_params.py), the params come wrapped in a
    read-only view that records every key the stage reads; at exit one JSON line {stage, argv, reads} is
    appended to <file>, the stage named by DVC's own DVC_STAGE variable.
    """
    try:
        params = load_params(path)
    except ParamsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    record_to = os.environ.get(RECORD_ENV)
    if not record_to:
        return params
    reads: set[str] = set()
    atexit.register(_append_record, record_to, reads)
    return ModelView(params, "", reads)  # type: ignore[return-value]  # quacks (and isinstance-checks) as Params


# --- Recording which params keys a stage reads -------------------------------------------------------------
# Keys are dotted paths (`train.seeds`, `sources.efficientnet_lite0.kind`). Reading a field of a section records
# that field; reading a dict entry (`strategies["lora"]`, `"x" in sources`) records that entry; whatever reads a
# whole section or dict at once (model_dump, iteration, len, items, repr, ==, pickling) records the section itself,
# "" for the whole params. A dict's values are returned as they are (a strategy's raw entry, to be validated by
# its own config class); C code that reads a dict's storage directly (pydantic validating a dict) is not seen, so
# such an entry is recorded when it is looked up, not when its keys are read.
RECORD_ENV = "TRANSFERLAB_RECORD_PARAMS"


_SCHEMA_ATTRS = frozenset({"model_fields", "model_computed_fields", "model_config"})


def _key(path: str, name: Any) -> str:
    return f"{path}.{name}" if path else str(name)


def _wrap(value: Any, path: str, reads: set[str]) -> Any:
    if isinstance(value, BaseModel):
        return ModelView(value, path, reads)
    if isinstance(value, dict):
        return MappingView(value, path, reads)
    reads.add(path)
    return value


def _read_only(*_: Any, **__: Any) -> Any:
    raise TypeError("params are read-only")


class ModelView:
    """A read-only view of a params model that records the dotted key of every field read (see RECORD_ENV)."""

    __slots__ = ("_model", "_path", "_reads")

    def __init__(self, model: BaseModel, path: str, reads: set[str]) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    @property  # isinstance(view, Params) holds, as it does for the model itself
    def __class__(self) -> type:
        return type(self._model)

    def _whole(self) -> BaseModel:
        self._reads.add(self._path)
        return self._model

    def __getattr__(self, name: str) -> Any:
        if name in type(self._model).model_fields:
            return _wrap(getattr(self._model, name), _key(self._path, name), self._reads)
        if name in _SCHEMA_ATTRS:  # the schema, not the values
            return getattr(self._model, name)
        if name in ("model_dump", "model_dump_json"):
            return self._dump(getattr(self._model, name))
        # model_dump(), a method such as SourceSpec.modality: it may read any field.
        return getattr(self._whole(), name)

    def _dump(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """`model_dump(include=..., exclude=...)` records the fields it dumps, the whole model without either."""

        def dump(*args: Any, include: Any = None, exclude: Any = None, **kwargs: Any) -> Any:
            if include is None and exclude is None:
                self._whole()
            else:
                for f in type(self._model).model_fields:
                    dropped = (
                        exclude is not None
                        and f in exclude
                        and (not isinstance(exclude, dict) or exclude[f] in (True, ...))
                    )
                    if (include is None or f in include) and not dropped:  # a partly excluded field counts as read
                        self._reads.add(_key(self._path, f))
            return method(*args, include=include, exclude=exclude, **kwargs)

        return dump

    __setattr__ = __delattr__ = _read_only

    def __eq__(self, other: object) -> bool:
        return self._whole() == (other._whole() if isinstance(other, ModelView) else other)

    def __hash__(self) -> int:
        return hash(self._whole())

    def __iter__(self):
        return iter(self._whole())

    def __repr__(self) -> str:
        return repr(self._whole())

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickled, copied: the plain model
        return self._whole().__reduce_ex__(protocol)

    def __dir__(self) -> list[str]:
        return dir(self._model)


class MappingView(dict):
    """A read-only view of a params dict (`sources`, `strategies`, ...): looking up an entry records
    `<dict>.<key>`; iterating or sizing it records the dict (see RECORD_ENV)."""

    def __init__(self, data: dict, path: str, reads: set[str]) -> None:
        super().__init__(data)
        self._path, self._reads = path, reads

    def _whole(self) -> None:
        self._reads.add(self._path)

    def _entry(self, key: Any) -> Any:
        path = _key(self._path, key)
        value = super().__getitem__(key)
        if isinstance(value, BaseModel):
            return ModelView(value, path, self._reads)
        self._reads.add(path)
        return value

    def __getitem__(self, key: Any) -> Any:
        if not super().__contains__(key):
            self._reads.add(_key(self._path, key))
            raise KeyError(key)
        return self._entry(key)

    def get(self, key: Any, default: Any = None) -> Any:
        if not super().__contains__(key):
            self._reads.add(_key(self._path, key))
            return default
        return self._entry(key)

    def __contains__(self, key: object) -> bool:
        self._reads.add(_key(self._path, key))
        return super().__contains__(key)

    def __iter__(self):
        self._whole()
        return super().__iter__()

    def __len__(self) -> int:
        self._whole()
        return super().__len__()

    def keys(self):
        self._whole()
        return super().keys()

    def values(self):
        self._whole()
        return super().values()

    def items(self):
        self._whole()
        return super().items()

    def copy(self) -> dict:
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        return self.copy() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.copy())

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickled, copied: the plain dict
        return (dict, (self.copy(),))

    __setitem__ = __delitem__ = pop = popitem = clear = update = setdefault = __ior__ = _read_only


def _append_record(path: str, reads: set[str]) -> None:
    line = json.dumps({"stage": os.environ.get("DVC_STAGE"), "argv": sys.argv, "reads": sorted(reads)})
    with open(path, "a", encoding="utf-8") as f:  # one write per process: stages of one repro run one at a time
        f.write(line + "\n")


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
