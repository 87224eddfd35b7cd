"""Judging trained models: test metrics (`metrics`: accuracy, macro F1, calibration), the one macro F1
and the one bootstrap of a gain (`stats`), the classical baselines (`baselines`: raw-pixel and TF-IDF
logistic regression), every strategy against the baseline with the seed-and-sample bootstrap, verdicts and
the recommendation (`comparison`), and evaluate@'s computation with its per-sample predictions files
(`predictions`: `evaluate_model`, which `transferlab audit --reevaluate` reruns); the dense tasks' metrics
(`dense_metrics`: COCO mAP, IoU, per-image records and their bootstrap).

Layer: beside `scoring` (neither imports the other), above `config`; may import any layer below.
"""
