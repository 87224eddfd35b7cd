"""Loading params: the pydantic schemas of `params.py`, then each registry checks its own section.

`params.py` is a leaf: it knows the shape of every section and the checks that need nothing but the values.
What only a registry knows is checked here, after parsing, over the whole section whether or not this run
uses the entry (a typo in `tune.space.lora` fails even while `lora` is not in `tune.strategies`):

* `pretrain.<name>`: `transferlab.training.pretraining.PretrainSpec`;
* `strategies.<name>` and `agreement.finetune`: the strategy registry's own config, and its modalities;
* `tune.space.<name>`: the search space parses and each corner is a valid config of its strategy;
* `dense.strategies.<name>`: the dense strategy registry's config, and the task it supports.

Every problem is a `ParamsError` naming the key, the value and the fix, before any stage does work.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from transferlab.params import DATASET_MODALITY, Params, ParamsError


def _describe(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{loc}: unknown key.{hint} Valid keys here: {valid}"
    if not err["loc"]:  # a cross-check over several sections: its message names the keys itself
        return msg.removeprefix("Value error, ")
    return f"{loc}: {msg} (got {err.get('input')!r})"


def _valid_keys(loc: tuple) -> list[str]:
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file.

    Args:
        path: the YAML file (DVC's `params.yaml` by default).

    Returns:
        The validated, immutable params.

    Raises:
        ParamsError: the file is missing, is not YAML, or holds an unknown key or a bad value; the
            message lists every problem with its key, its value and the valid choices.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    return parse_params(raw, origin=str(path))


def parse_params(raw: dict[str, Any], origin: str = "params") -> Params:
    """Validate an already-loaded params mapping (see `load_params`)."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e, Params) for e in exc.errors()]
        raise ParamsError(f"{origin} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)) from None
    try:
        check_registries(params)
    except ValueError as exc:
        raise ParamsError(f"{origin} has 1 problem(s):\n  - {exc}") from None
    except KeyError as exc:  # strategy_config: an unknown strategy kind
        raise ParamsError(f"{origin}: {exc}") from None
    return params


def check_registries(params: Params) -> None:
    """The checks only a registry can make, each over its whole section (see the module docstring).

    Raises:
        ValueError: naming `pretrain.<name>.<key>`, `strategies.<name>[.<key>]` or `tune.space.<name>[.<key>]`.
        KeyError: an unknown strategy kind, with the valid ones.
    """
    from transferlab.strategies import STRATEGIES, strategy_config
    from transferlab.training.pretraining import PretrainSpec
    from transferlab.tuning.space import check_tune_spaces

    for name, raw in params.pretrain.items():
        try:
            PretrainSpec.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(
                "; ".join(f"pretrain.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            ) from None
    modality = DATASET_MODALITY[params.data.dataset]
    for name, raw in [("agreement.finetune", params.agreement.finetune), *params.strategies.items()]:
        kind = strategy_config(name, raw).kind
        supported = STRATEGIES[kind].modalities
        if modality not in supported:
            raise ValueError(
                f"strategies.{name}: '{kind}' works on {list(supported)} only, and data.dataset "
                f"'{params.data.dataset}' is {modality}: remove it from this profile"
            )
    check_tune_spaces(params.tune.strategies, params.tune.space, params.strategies)
    if params.deploy.dann is not None and "dann" in STRATEGIES:  # the deployment study's DANN entry
        strategy_config("deploy.dann", {"kind": "dann", **params.deploy.dann})
    # The dense pipeline's strategies: their own registry, checked against dense.task.
    from transferlab.strategies.dense import dense_strategy_config

    for name, raw in params.dense.strategies.items():
        dense_strategy_config(name, raw, params.dense.task, classification=lambda k: k in STRATEGIES)
