"""`lora`: low-rank adapters (peft LoRA) on the backbone's conv and linear layers (a text encoder's
attention query and value projections), plus a new head.

Follows peft's timm recipe: `target_modules` = the backbone's dense convolutions and linear layers,
`modules_to_save` = the classifier. The saved artifact is the adapter and the head only (a few hundred KB
instead of the whole network); `load` rebuilds the source, applies the adapter, and reproduces the
trained model's predictions exactly. Depthwise convolutions (groups > 1) are left frozen: a low-rank
update of a per-channel 3x3 filter saves nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.core.io import write_json, write_text
from transferlab.models.sources import SourceModel, with_new_head
from transferlab.strategies.base import Strategy, StrategyConfig, register_strategy

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


class LoraConfig(StrategyConfig):
    # Rank 8 / alpha 16 is the peft default pairing (scale alpha/r = 2); enough for small targets.
    rank: int = Field(8, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (update scaled by alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch")
    lr: float = Field(3e-3, gt=0, le=10)


# peft's usual targets for BERT-like encoders: the query and value projections of self-attention (the
# LoRA paper's choice), under the names BERT / MiniLM, DistilBERT and most newer encoders use.
TEXT_TARGETS = ("query", "value", "q_lin", "v_lin", "q_proj", "v_proj")


def lora_targets(model: nn.Module, classifier: str) -> list[str]:
    """Names of the dense Conv2d and Linear layers outside the classifier; for a text encoder, the
    attention's query and value projections."""
    from torch import nn

    if getattr(model, "modality", "image") == "text":
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TEXT_TARGETS]
    names = []
    for name, m in model.named_modules():
        if name == classifier or name.startswith(classifier + "."):
            continue
        if (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear):
            names.append(name)
    return names


@register_strategy
class Lora(Strategy):
    name = "lora"
    summary = "peft LoRA adapters on dense conv/linear layers + new head"
    Config = LoraConfig

    def build(self, source: SourceModel, num_classes: int, cfg: LoraConfig, seed: int) -> nn.Module:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = with_new_head(source.model, num_classes, seed)
        classifier = model.pretrained_cfg.get("classifier", "classifier")
        targets = lora_targets(model, classifier)
        if not targets:
            raise ValueError(f"strategies.lora: {source.arch} has no dense Conv2d/Linear layers to adapt")
        config = PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            modules_to_save=[classifier],
        )
        peft_model = get_peft_model(model, config)
        trainable, total = peft_model.get_nb_trainable_parameters()
        log.info(
            "LoRA r=%d on %d layers: %d trainable of %d (%.2f%%)",
            cfg.rank,
            len(targets),
            trainable,
            total,
            100 * trainable / total,
        )
        return peft_model

    def save(self, model: nn.Module, out_dir: Path, meta: dict) -> None:
        import peft

        # save_pretrained writes adapter_model.safetensors + adapter_config.json (with peft's version).
        model.save_pretrained(str(out_dir / "adapter"))
        # peft keeps target_modules as a set and writes it in hash order, which changes with each
        # interpreter (PYTHONHASHSEED): sorted, an identical rerun writes an identical file (and DVC's cache
        # keeps the evaluate@ stage downstream).
        config_path = out_dir / "adapter" / "adapter_config.json"
        config = json.loads(config_path.read_text())
        for key in ("target_modules", "modules_to_save"):
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
        write_text(config_path, json.dumps(config, indent=2, sort_keys=True))
        write_json(out_dir / "model_meta.json", {**meta, "peft_version": peft.__version__})

    def load(self, out_dir: Path, load_source: Callable[[], SourceModel]) -> nn.Module:
        from peft import PeftModel

        meta = self.read_meta(out_dir)
        base = with_new_head(load_source().model, meta["num_classes"], 0)  # head weights come from the adapter
        return PeftModel.from_pretrained(base, str(out_dir / "adapter")).eval()
