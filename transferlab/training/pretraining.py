"""In-pipeline source models: pre-train a small network on a known source task (MNIST digits by default),
so that the source task's accuracy can be measured before and after transfer (catastrophic forgetting),
and so that a near-domain source can be contrasted with ImageNet ones."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from transferlab.core.io import save_torch, write_npy
from transferlab.params import DataParams

if TYPE_CHECKING:
    import torch

    from transferlab.training.loop import TrainResult

# params validation reads `PretrainSpec`: torch, timm and the training loop are imported by `pretrain` only.


class PretrainSpec(BaseModel):
    """`pretrain.<name>` in params: what to train and on which source task.

    kind `classifier` (images): `arch` trained from scratch on `dataset`. kind `dapt` (text): domain-adaptive
    pre-training (Gururangan et al., ACL 2020): the text encoder `base` continues masked-LM training on the
    target's unlabeled texts (the prepared train pool, never a validation or test text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["classifier", "dapt"] = Field("classifier", description="classifier (images) | dapt (text)")
    base: str = Field("minilm", description="dapt: the text encoder to adapt (packaged name, folder or hub id)")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="dapt: fraction of tokens masked (BERT's 80/10/10)")
    head_epochs: int = Field(
        1, ge=0, description="dapt: epochs fitting only the masked-LM head (the encoder frozen) before adapting"
    )
    head_lr: float = Field(3e-3, gt=0, description="dapt: rate of the head-only phase (a new head learns fast)")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="dapt: unlabeled texts held out for the MLM loss")
    dataset: str = Field("mnist_digits", description="a dataset loader name (see transferlab.data.loaders.LOADERS)")
    path: str | None = Field(None, description="dataset folder, for loaders that need one")
    # ResNet-10-T reached 96% on held-out digits after 2 epochs of 2,000 images (about a minute on 2 cores);
    # MobileNetV3-small reached 39% with the same budget: depthwise nets train slowly from scratch.
    arch: str = Field("resnet10t", description="timm architecture, trained from random init")
    # Digits need no more than 32 px; the network is fully convolutional, so it runs at the target size too.
    image_size: int = Field(32, ge=16, le=512, description="pre-training image size (source task)")
    train_per_class: int = Field(200, ge=1)
    test_per_class: int = Field(100, ge=1, description="held-out source-task test set (kept for forgetting checks)")
    epochs: int = Field(2, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)


def pretrain(
    spec: PretrainSpec, seed: int, generator: torch.Generator, label: str = "pretrain"
) -> tuple[TrainResult, dict, dict]:
    """Train `spec.arch` from scratch on the source task.

    Returns:
        (result, source_test, metrics): the trained model, the held-out source test split {images, labels,
        class_names}, and {source_test_accuracy, ...}.
    """
    import timm
    import torch

    from transferlab.data.loaders import load_dataset
    from transferlab.data.splits import prepare_splits
    from transferlab.models.inference import predict_logits
    from transferlab.strategies.base import Strategy, StrategyConfig
    from transferlab.training.loop import fit, image_batches
    from transferlab.training.recipe import TrainRecipe

    data_params = DataParams(
        dataset=spec.dataset,
        path=spec.path,
        image_size=spec.image_size,
        train_per_class=spec.train_per_class,
        val_per_class=max(1, spec.test_per_class // 2),
        test_per_class=spec.test_per_class,
    )
    raw = load_dataset(data_params)
    splits, _ = prepare_splits(raw, data_params, seed)
    torch.manual_seed(seed)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=len(raw.class_names))
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    cfg = StrategyConfig(kind="scratch", lr=spec.lr)
    result = fit(
        model,
        Strategy(),
        cfg,
        image_batches(splits["train"]["images"], norm, "crop", generator),
        splits["train"]["labels"],
        image_batches(splits["val"]["images"], norm, "none", generator),
        splits["val"]["labels"],
        # A fixed budget of `spec.epochs` on the CPU, the loop's default schedule; weight decay as train@'s default.
        TrainRecipe(epochs=spec.epochs, batch_size=spec.batch_size, patience=spec.epochs, weight_decay=1e-4),
        generator=generator,
        label=label,
    )
    test_images, test_labels = splits["test"]["images"], splits["test"]["labels"]
    batches = image_batches(test_images, norm, "none", generator)
    logits = predict_logits(result.model, lambda idx: batches(idx, False), len(test_labels))
    accuracy = float((logits.argmax(1).numpy() == test_labels).mean())
    metrics = {
        "source_test_accuracy": round(accuracy, 6),
        "source_val_accuracy": round(result.best_val_accuracy, 6),
        "best_epoch": result.best_epoch,
        "source_classes": len(raw.class_names),
        "source_train_samples": int(len(splits["train"]["labels"])),
        "source_test_samples": int(len(test_labels)),
    }
    source_test = {"images": test_images, "labels": test_labels, "class_names": raw.class_names, **norm}
    return result, source_test, metrics


def save_pretrained(out_dir: str | Path, result: TrainResult, spec: PretrainSpec, source_test: dict) -> None:
    """model.pt (what `backbones` kind 'pipeline' loads) + the held-out source-task test split."""
    out_dir = Path(out_dir)
    save_torch(
        out_dir / "model.pt",
        {
            "arch": spec.arch,
            "num_classes": len(source_test["class_names"]),
            "kwargs": {},
            "mean": list(source_test["mean"]),
            "std": list(source_test["std"]),
            "state_dict": result.model.state_dict(),
            "class_names": source_test["class_names"],
        },
    )
    write_npy(out_dir / "source_test_images.npy", source_test["images"])
    write_npy(out_dir / "source_test_labels.npy", np.asarray(source_test["labels"]))


def _mask_tokens(
    ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab: int, prob: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: `prob` of the real tokens chosen; of those 80% -> [MASK], 10% -> a random token, 10%
    kept. Returns (inputs, chosen) with padding (-1) untouched."""
    import torch

    real = (ids >= 0) & ~special
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & real
    roll = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(1000, vocab, (int(swap.sum()),), generator=gen)
    return inputs, chosen


def domain_adaptive_pretrain(
    spec: PretrainSpec, texts: list[str], vocab_sha256: str, max_length: int, seed: int, generator: torch.Generator
) -> tuple[torch.nn.Module, dict, list[dict]]:
    """Continue masked-LM pre-training of `spec.base` on unlabeled target texts.

    The masked-LM head is fitted first with the encoder frozen (`head_epochs`): the packaged sentence
    encoder ships without one, and the held-out MLM loss after that phase is the unadapted encoder's loss on
    the target domain. Then the whole model trains for `epochs`; the held-out loss after it is the adapted
    one. Masks are drawn from the seeded generator (the same held-out masks before and after).

    Returns:
        (classifier, metrics, history): the adapted encoder as a `TextClassifier` without a head, metrics
        {mlm_loss_heldout_head_only (the encoder as it was, under a head fitted for head_epochs),
        mlm_loss_heldout_adapted, ...}, per-epoch rows.

    Raises:
        ValueError: no unlabeled texts, or a base whose vocabulary is not the prepared one.
    """
    import time

    import torch
    from transformers import AutoModelForMaskedLM

    from transferlab.data.tokenize import _from_pretrained, load_tokenizer, resolve, tokenize, vocabulary_sha256
    from transferlab.models.text_encoder import build_text_classifier

    if len(texts) < 10:
        raise ValueError(f"dapt needs unlabeled texts: {len(texts)} prepared (raise data.unlabeled_texts)")
    tokenizer = load_tokenizer(spec.base)
    if vocabulary_sha256(tokenizer) != vocab_sha256:
        raise ValueError(f"dapt base '{spec.base}' has another vocabulary than data.tokenizer: use that model")
    where = resolve(spec.base)
    mlm = _from_pretrained(AutoModelForMaskedLM, where, "masked-LM weights")
    if not hasattr(mlm, "bert") or not hasattr(mlm, "cls"):
        raise ValueError(f"dapt: '{spec.base}' is a {type(mlm).__name__}; dapt supports BERT-family encoders")
    torch.manual_seed(seed)
    for module in mlm.cls.modules():  # the head: absent from a sentence encoder's checkpoint, seeded init
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    ids_np, _ = tokenize(texts, tokenizer, max_length)
    ids = torch.from_numpy(ids_np.astype(np.int64))
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    n_held = max(1, int(round(len(ids) * spec.heldout_fraction)))
    order = torch.randperm(len(ids), generator=generator)
    held, train = order[:n_held], order[n_held:]
    held_gen = torch.Generator().manual_seed(seed + 1)
    held_inputs, held_chosen = _mask_tokens(
        ids[held], special[held], tokenizer.mask_token_id, len(tokenizer), spec.mask_prob, held_gen
    )

    def mlm_loss(inputs: torch.Tensor, targets: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        keep = (inputs >= 0).any(0)
        inputs, targets, chosen = inputs[:, keep], targets[:, keep], chosen[:, keep]
        hidden = mlm.bert(input_ids=inputs.clamp(min=0), attention_mask=(inputs >= 0).long()).last_hidden_state
        logits = mlm.cls(hidden[chosen])  # the vocabulary projection only where a token was masked
        return torch.nn.functional.cross_entropy(logits, targets[chosen])

    def heldout() -> float:
        mlm.eval()
        with torch.no_grad():
            losses = [
                float(mlm_loss(held_inputs[i : i + 64], ids[held][i : i + 64], held_chosen[i : i + 64]))
                * int(held_chosen[i : i + 64].sum())
                for i in range(0, n_held, 64)
            ]
        return sum(losses) / max(int(held_chosen.sum()), 1)

    history: list[dict] = []
    start = time.perf_counter()

    def run_epochs(n: int, params: list, phase: str, lr: float) -> None:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        for _ in range(n):
            mlm.train()
            perm = train[torch.randperm(len(train), generator=generator)]
            total, count = 0.0, 0
            for i in range(0, len(perm), spec.batch_size):
                b = perm[i : i + spec.batch_size]
                inputs, chosen = _mask_tokens(
                    ids[b], special[b], tokenizer.mask_token_id, len(tokenizer), spec.mask_prob, generator
                )
                if not chosen.any():
                    continue
                loss = mlm_loss(inputs, ids[b], chosen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + float(loss.detach()) * len(b), count + len(b)
            history.append(
                {
                    "epoch": len(history) + 1,
                    "phase": phase,
                    "train_mlm_loss": round(total / max(count, 1), 6),
                    "heldout_mlm_loss": round(heldout(), 6),
                }
            )

    for p in mlm.bert.parameters():
        p.requires_grad_(False)
    head_params = [p for p in mlm.cls.parameters() if p.requires_grad]
    run_epochs(spec.head_epochs, head_params, "head", spec.head_lr)
    unadapted = history[-1]["heldout_mlm_loss"] if history else round(heldout(), 6)
    for p in mlm.parameters():
        p.requires_grad_(True)
    run_epochs(spec.epochs, list(mlm.parameters()), "adapt", spec.lr)
    encoder = mlm.bert
    classifier = build_text_classifier(encoder, 0)
    metrics = {
        "mlm_loss_heldout_head_only": unadapted,
        "mlm_loss_heldout_adapted": history[-1]["heldout_mlm_loss"],
        "unlabeled_texts": len(train),
        "heldout_texts": n_held,
        "masked_heldout_tokens": int(held_chosen.sum()),
        "train_seconds": round(time.perf_counter() - start, 3),
    }
    return classifier.eval(), metrics, history


def save_dapt(out_dir: str | Path, model: torch.nn.Module, spec: PretrainSpec) -> None:
    """model.pt in the layout `backbones` kind 'pipeline' loads: a text encoder without a head."""
    from transferlab.data.tokenize import resolve

    where = resolve(spec.base)
    save_torch(
        Path(out_dir) / "model.pt",
        {
            "arch": "text",
            "num_classes": 0,
            "kwargs": {"text_config": model.encoder.config.to_dict(), "tokenizer": where},
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "state_dict": model.state_dict(),
            "class_names": [],
        },
    )
