"""Text encoders that look like timm models to the rest of the pipeline.

The stages, strategies and checks were written against timm's interface (`forward_features`,
`forward_head(pre_logits=True)`, `get_classifier`, `reset_classifier`, `group_matcher`). `TextClassifier`
gives a Hugging Face encoder (BERT, MiniLM, ...) that interface: mean pooling over real tokens (the pooling
all-MiniLM-L6-v2 was trained with) and a linear head. So linear probes, partial and full fine-tuning, LoRA,
L2-SP and scratch run on text through the same code as on images.

Inputs are the token ids prepared once by `prepare` (`transferlab.data.tokenize`); every text source of a
run must share the prepared vocabulary (checked by `features@` against the tokenizer's vocabulary hash).
transformers and torch are imported inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.data.tokenize import _from_pretrained, resolve

if TYPE_CHECKING:
    import torch
    from torch import nn


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
