"""Judging trained models: test metrics (`metrics`: accuracy, macro F1, calibration, latency), the
classical baselines (`baselines`: raw-pixel and TF-IDF logistic regression), every strategy against
the baseline with the seed-and-sample bootstrap, verdicts and the recommendation (`comparison`), and the
per-sample predictions files (`predictions`).

Layer: beside `scoring` (neither imports the other), above `config`; may import any layer below.
"""
