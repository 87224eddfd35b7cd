"""What went wrong in a transfer: pure measurements (`measures`: CKA, MMD, proxy
A-distance, BN gap, weight drift; `text_measures`: surface and tokenizer rates, normalisation, the fortunes
corpus), findings with severity, evidence and remedy (`findings`), the stage's inputs read once (`inputs`),
and the check registry (`checks/`: one module per check, measure -> grade -> remedy -> re-measure).

Layer: above `scoring` and `evaluation`; may import any layer below, never reporting or provenance.
"""
