"""What the text checks measure about texts themselves: surface rates, tokenizer rates, normalisation and
the general-English reference corpus.

Surface rates (URLs, mentions, hashtags, emoji, elongations, non-ASCII) and tokenizer rates (unknown tokens,
word pieces per word) compare the target texts with Debian's `fortunes` (general English: quotations,
literature, sayings; the jargon files left out). `normalise` is the remedy the text domain-shift check
re-measures.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    pass
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
