"""Tiny classifiers and data sets built in the tests themselves: random weights, no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "fun", "warm"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "sad", "cold"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "really", "very", "quite", "story", "and", "but", "a", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
LABELS = ["negative", "positive"]


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def tiny_bert_config(layers: int = 2, hidden: int = 16, heads: int = 2, intermediate: int = 32) -> BertConfig:
    return BertConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=64, num_labels=2,
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def make_tiny_bert(folder: Path, seed: int = 0, **config) -> Path:
    """A random 2-layer BERT classifier saved as an ordinary Hugging Face directory."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(**config))
    model.save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


def sentences(count: int, seed: int = 0, noise: float = 0.0) -> list[dict]:
    """Short reviews whose label is set by their sentiment words; ``noise`` flips a fraction."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label else NEGATIVE, rng.randint(1, 2))
        rng.shuffle(words)
        if rng.random() < noise:
            label = 1 - label
        rows.append({"text": " ".join(words), "label": LABELS[label]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
