"""Where a number came from: MLflow runs and provenance records (`tracking`), reading a revision
without checking it out (`revisions`: git show, dvc.lock, the DVC cache), `transferlab review` (a PR
against its base, `review`) and `transferlab audit` (the hash chain commit -> files, `audit`).

Layer: beside `reporting` (neither imports the other), above `diagnosis`; may import any layer below.
"""
