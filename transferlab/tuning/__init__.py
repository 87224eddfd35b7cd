"""Hyper-parameter tuning of one strategy (`tune@<strategy>`): the search space parsed from
`tune.space` and checked against the strategy's config (`space`), the per-epoch reporting wrapper
(`objective`), and two backends: Optuna (`optuna_backend`) and Ray Tune (`ray_backend`).

Layer: above `training`. May import `params`, `core`, `data`, `models`, `strategies` and `training`.
"""
