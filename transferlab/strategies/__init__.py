"""Registry of transfer strategies, one module each; adding one is a module and a decorator.

A `strategies.<name>` entry in params picks its strategy by `kind` (default: the entry's own name), so
`finetune_full_lr1e-2: {kind: finetune_full, lr: 0.01}` runs a second copy with another learning rate.

The registry is lazy: `transferlab/strategies/<name>.py` holds the strategy `<name>`, and its module is
imported the first time that strategy is asked for. Validating params therefore imports only the strategies
the params name, and none of them imports torch at module level (see `base.py`).

The dense tasks (detection, segmentation) have their own registry in `dense.py` (not a classification
strategy module: `base.NOT_STRATEGIES`).

Layer: above `models`. May import `params`, `core`, `data` and `models`; never `training` or above (the
training loop calls strategies, not the other way round).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from transferlab.strategies.base import STRATEGIES, Strategy, StrategyConfig, register_strategy

__all__ = ["STRATEGIES", "Strategy", "StrategyConfig", "register_strategy", "get_strategy", "strategy_config"]


def get_strategy(kind: str) -> Strategy:
    """The registered strategy called `kind`.

    Raises:
        KeyError: unknown name; the message lists the valid ones.
    """
    return STRATEGIES[kind]  # KeyError with the valid names when unknown


def strategy_config(name: str, raw: dict[str, Any] | None) -> StrategyConfig:
    """Validate `strategies.<name>` with its strategy's own config class.

    Raises:
        ValueError: unknown kind, unknown key or bad value, naming `strategies.<name>.<key>`.
    """
    raw = dict(raw or {})
    kind = raw.get("kind", name)
    if kind not in STRATEGIES:
        raise ValueError(
            f"strategies.{name}: unknown strategy kind '{kind}' (valid: {sorted(STRATEGIES)}; set `kind:` "
            "when the entry's name is not a strategy name)"
        )
    raw["kind"] = kind
    cls = STRATEGIES[kind].Config
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(f"strategies.{name}.{loc}: unknown key (valid keys: {sorted(cls.model_fields)})")
            else:
                problems.append(f"strategies.{name}.{loc}: {e['msg']} (got {e.get('input')!r})")
        raise ValueError("; ".join(problems)) from None
