"""Tiny constructed tasks for the application tests: trained in a few seconds, no downloads.

``twist_task``: a sentiment model trained on ordinary reviews, where the word
"twist" was never seen. Reviews that contain "twist" are negative whatever else
they say, so the model gets them wrong. The training set (or a pool) holds a few
such reviews: they are the points that fix it, and they are known in advance.

``noisy_task``: a sentiment model trained on reviews with a known set of labels
flipped, for mislabel finding.
"""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "fun", "warm"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "sad", "cold"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "really", "very", "quite", "story", "and", "but", "a", "it"]
MARKER = "twist"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER, MARKER, "ending"]
LABELS = ["negative", "positive"]


def tokenizer_for(folder: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over our vocabulary (transformers 4 takes vocab_file, 5 takes vocab)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(vocab_file=str(path), do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab=str(path), do_lower_case=True)
    assert len(tokenizer.get_vocab()) == len(VOCAB), "the tokenizer did not load its vocabulary"
    return tokenizer


def review(rng: random.Random, label: int, marker: bool = False) -> dict:
    words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label else NEGATIVE, rng.randint(1, 2))
    if marker:
        words = rng.sample(FILLER, 2) + rng.sample(POSITIVE, 2) + [MARKER]
    rng.shuffle(words)
    return {"text": " ".join(words), "label": LABELS[0 if marker else label]}


def reviews(count: int, seed: int, marker: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [review(rng, rng.randrange(2), marker) for _ in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_model(folder: Path, rows: list[dict], *, seed: int = 0, epochs: int = 30, lr: float = 3e-3,
                hidden: int = 16, layers: int = 2) -> Path:
    """A tiny BERT trained on ``rows`` (every parameter, Adam), saved as a Hugging Face directory."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=2,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.1)
    model = BertForSequenceClassification(config)
    tokenizer = tokenizer_for(folder)
    encoded = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([LABELS.index(r["label"]) for r in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(rows), 16):
            batch = order[start : start + 16]
            logits = model(input_ids=encoded["input_ids"][batch], attention_mask=encoded["attention_mask"][batch],
                           token_type_ids=encoded["token_type_ids"][batch]).logits
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def twist_task(root: Path) -> dict:
    """Model trained on plain reviews; train.jsonl = plain + 8 "twist" reviews; pool, anchors, evaluation.

    Paths are relative to ``root`` (a data root).
    """
    plain = reviews(120, seed=1)
    train_model(root / "twist-model", plain, seed=0)
    fixes = reviews(8, seed=2, marker=True)
    train_rows = plain + fixes  # the fixes are the last 8 training examples
    write_jsonl(root / "twist-train.jsonl", train_rows)
    pool = reviews(40, seed=3) + reviews(8, seed=4, marker=True)  # the fixes are the last 8 of the pool
    write_jsonl(root / "twist-pool.jsonl", pool)
    anchors = reviews(4, seed=5, marker=True)
    evaluation = reviews(40, seed=6, marker=True)
    write_jsonl(root / "twist-eval.jsonl", evaluation)
    return {"model": "twist-model", "train": "twist-train.jsonl", "pool": "twist-pool.jsonl",
            "eval": "twist-eval.jsonl", "anchors": anchors, "evaluation": evaluation,
            "fix_train_indices": list(range(len(plain), len(train_rows))),
            "fix_pool_indices": list(range(40, 48)), "num_train": len(train_rows)}


def noisy_task(root: Path, count: int = 80, flips: int = 8) -> dict:
    """Model trained on ``count`` reviews of which ``flips`` (known) have the wrong label."""
    rows = reviews(count, seed=11)
    rng = random.Random(12)
    flipped = sorted(rng.sample(range(count), flips))
    for i in flipped:
        rows[i] = {**rows[i], "label": LABELS[1 - LABELS.index(rows[i]["label"])]}
    write_jsonl(root / "noisy-train.jsonl", rows)
    train_model(root / "noisy-model", rows, seed=1, epochs=12)
    return {"model": "noisy-model", "train": "noisy-train.jsonl", "flipped": flipped, "num_train": count}
