"""Choosing a source before training: transferability estimators (`estimators`: LogME, LEEP, NCE,
H-score, kNN, linear probe, SFDA), ranking and selection under budgets (`selection`), and closing the loop,
estimates against achieved accuracies (`agreement`).

Layer: beside `evaluation` (neither imports the other), above `config`; may import any layer below.
"""
