"""transferlab: which pre-trained source and which transfer technique for your classification task.

The library behind the DVC stages in `stages/`: data loading and splitting, source-model registry,
transfer-strategy registry, training, evaluation, comparison and MLflow tracking. Nothing here reads
argv, touches DVC or sets global state at import.
"""

__version__ = "0.1.0"
