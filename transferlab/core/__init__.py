"""Plumbing every layer shares: atomic writes and content hashes (`io`), where per-seed outputs and
predictions live (`layout`), one `seed_everything` (`seeding`), `train.device` and mixed precision
(`device`), data-parallel helpers for torchrun (`distributed`), the
bootstrap's draws and percentile interval (`resampling`: shared by evaluation and scoring, which are siblings).

Layer: above `params` only. Imports `transferlab.params` (and third-party libraries), nothing else here.
"""
