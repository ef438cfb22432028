"""Tiny classifiers and data sets built in the tests themselves: random weights, no downloads."""

from __future__ import annotations

import inspect
import json
import random
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "fun", "warm"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "sad", "cold"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "really", "very", "quite", "story", "and", "but", "a", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
LABELS = ["negative", "positive"]


def wordpiece_tokenizer(vocab_path: Path, cls=BertTokenizerFast):
    """A WordPiece tokenizer over ``vocab_path``; checks that it really holds the vocabulary.

    transformers 5 takes the vocabulary as ``vocab`` and silently ignores ``vocab_file``
    (the tokenizer then knows only the special tokens and maps every word to [UNK]);
    transformers 4 takes ``vocab_file``.
    """
    if "vocab_file" in inspect.signature(cls.__init__).parameters:
        tokenizer = cls(vocab_file=str(vocab_path), do_lower_case=True)
    else:
        tokenizer = cls(vocab=str(vocab_path), do_lower_case=True)
    words = vocab_path.read_text().split()
    assert len(tokenizer.get_vocab()) == len(words), "the tokenizer did not load its vocabulary"
    return tokenizer


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return wordpiece_tokenizer(folder / "vocab.txt")


def tiny_bert_config(layers: int = 2, hidden: int = 16, heads: int = 2, intermediate: int = 32,
                     initializer_range: float = 0.02) -> BertConfig:
    return BertConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=64, num_labels=2,
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=initializer_range,
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


# -- other encoder families and an independent reference ------------------------------------
# Everything below is used by tests/test_engine_*.py. The reference helpers load a SECOND copy
# of a saved model with plain ``from_pretrained`` (eager attention) and differentiate the
# ordinary full-model loss example by example, so none of the engine's patched forwards
# (frozen-prefix bypass, first-token last block, JVP scoring) is involved in the reference.

FAMILIES = ("bert", "roberta", "distilbert", "deberta-v2", "electra")


def _label_kwargs() -> dict:
    return {"num_labels": 2, "id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}


def tiny_family_model(family: str, layers: int = 2, hidden: int = 16, heads: int = 2, intermediate: int = 32,
                      initializer_range: float = 0.3, **extra):
    """A random tiny sequence classifier of ``family`` (see FAMILIES); ``extra`` goes to the config."""
    from transformers import (DebertaV2Config, DebertaV2ForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification,
                              RobertaConfig, RobertaForSequenceClassification)

    common = dict(vocab_size=len(VOCAB), initializer_range=initializer_range, **_label_kwargs())
    bert_like = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=72)
    if family == "bert":
        return BertForSequenceClassification(BertConfig(**common, **bert_like, **extra))
    if family == "roberta":
        # pad id 0 is our tokenizer's [PAD]; RoBERTa's positions start after it.
        return RobertaForSequenceClassification(RobertaConfig(**common, **bert_like, pad_token_id=0, type_vocab_size=1,
                                                              classifier_dropout=0.0, **extra))
    if family == "distilbert":
        return DistilBertForSequenceClassification(DistilBertConfig(
            **common, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0, max_position_embeddings=72, **extra))
    if family == "deberta-v2":
        config = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=-1,
                      type_vocab_size=0, pooler_hidden_size=hidden, pooler_dropout=0.0, cls_dropout=0.0,
                      norm_rel_ebd="layer_norm", share_att_key=True)
        config.update(extra)
        return DebertaV2ForSequenceClassification(DebertaV2Config(**common, **bert_like, **config))
    if family == "electra":
        config = dict(embedding_size=hidden // 2, classifier_dropout=0.0)  # != hidden: embeddings_project exists
        config.update(extra)
        return ElectraForSequenceClassification(ElectraConfig(**common, **bert_like, **config))
    raise ValueError(f"unknown family {family!r}")


def make_tiny_family(folder: Path, family: str = "bert", seed: int = 0, **config) -> Path:
    """A random tiny classifier of ``family`` saved as an ordinary Hugging Face directory (safetensors)."""
    from transformers import DistilBertTokenizerFast

    torch.manual_seed(seed)
    model = tiny_family_model(family, **config)
    model.save_pretrained(folder)
    # DistilBERT's forward takes no token_type_ids, and its tokenizer makes none.
    tokenizer = make_tokenizer(folder)
    if family == "distilbert":
        tokenizer = wordpiece_tokenizer(folder / "vocab.txt", DistilBertTokenizerFast)
    tokenizer.save_pretrained(folder)
    return folder


def write_sentences(folder: Path, count: int, seed: int = 0, noise: float = 0.1, name: str = "train.jsonl") -> Path:
    return write_jsonl(folder / name, sentences(count, seed=seed, noise=noise))


class Reference:
    """The naive computation on an independent float64 copy of a saved classifier.

    ``loss(i)`` is the cross-entropy of one example run alone (no padding) through the whole
    model, plus ``(wd / 2) * ||theta_decay||^2`` over ``names`` minus biases and LayerNorm weights.
    """

    def __init__(self, folder: Path, names: list[str], weight_decay: float = 0.0, dtype=torch.float64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").to(dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.label2id = {name: i for i, name in self.model.config.id2label.items()}
        self.names = list(names)
        params = dict(self.model.named_parameters())
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = [params[n] for n in self.names]
        for p in self.params:
            p.requires_grad_(True)
        self.weight_decay = weight_decay
        self.decay = [not any(t in n for t in ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight"))
                      for n in self.names]
        self.dtype = dtype

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def theta(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def l2(self, params) -> torch.Tensor:
        if not self.weight_decay:
            return torch.zeros((), dtype=self.dtype)
        return 0.5 * self.weight_decay * sum((p * p).sum() for p, d in zip(params, self.decay) if d)

    def encode(self, text: str, text_pair: str | None = None) -> dict:
        return dict(self.tokenizer(text, text_pair, truncation=True, max_length=128, return_tensors="pt"))

    def logits(self, text: str, text_pair: str | None = None, params: dict | None = None) -> torch.Tensor:
        inputs = self.encode(text, text_pair)
        if params is None:
            return self.model(**inputs).logits[0]
        return torch.func.functional_call(self.model, params, args=(), kwargs=inputs, strict=False).logits[0]

    def label_id(self, label) -> int:
        return label if isinstance(label, int) else self.label2id[label]

    def loss(self, row: dict, params: dict | None = None) -> torch.Tensor:
        """Cross-entropy of one example plus the L2 term; ``row`` has text, label (and text_pair)."""
        logits = self.logits(row["text"], row.get("text_pair"), params)
        target = torch.tensor(self.label_id(row["label"]))
        values = list(params.values()) if params is not None else self.params
        return torch.nn.functional.cross_entropy(logits.unsqueeze(0), target.unsqueeze(0)) + self.l2(values)

    def gradient(self, row: dict) -> torch.Tensor:
        """∇θ of one example's loss, flat in ``names`` order."""
        grads = torch.autograd.grad(self.loss(row), self.params)
        return torch.cat([g.reshape(-1) for g in grads]).detach()

    def gradients(self, rows: list[dict]) -> torch.Tensor:
        return torch.stack([self.gradient(r) for r in rows])

    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(vector[start:start + p.numel()].view_as(p).to(self.dtype))
            start += p.numel()
        return out

    def mean_loss(self, rows: list[dict]) -> torch.Tensor:
        return sum(self.loss(r) for r in rows) / len(rows)

    def hvp(self, rows: list[dict], vector: torch.Tensor) -> torch.Tensor:
        """H·v by double backward, H the Hessian of the mean loss over ``rows``."""
        grads = torch.autograd.grad(self.mean_loss(rows), self.params, create_graph=True)
        hv = torch.autograd.grad(grads, self.params, grad_outputs=self.unflatten(vector))
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    def hessian(self, rows: list[dict]) -> torch.Tensor:
        """The exact Hessian of the mean loss over ``rows`` w.r.t. the flat ``names`` parameters."""
        theta0 = self.theta().clone()

        def mean_loss(flat: torch.Tensor) -> torch.Tensor:
            params, start = {}, 0
            for name, p in zip(self.names, self.params):
                params[name] = flat[start:start + p.numel()].view_as(p)
                start += p.numel()
            return sum(self.loss(r, params) for r in rows) / len(rows)

        return torch.autograd.functional.hessian(mean_loss, theta0).detach()


@contextmanager
def single_thread():
    """Run torch on one intra-op thread: tiny models gain nothing from more, and on a busy
    machine extra threads spin against other processes (a 1 s LiSSA run became 60 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_close(actual, expected, rtol: float) -> None:
    """Every element within ``rtol`` of the reference, relative to itself, with an absolute floor of
    ``rtol / 10`` of the largest reference magnitude (float32 rounding of near-zero elements)."""
    import numpy as np

    actual = np.asarray(actual.detach().double() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    expected = np.asarray(expected.detach().double() if isinstance(expected, torch.Tensor) else expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0.1 * rtol * float(np.abs(expected).max()))


def assert_same_build(actual, expected) -> None:
    """Two engines' built artefacts are equal to the bit: features, gradient keys, prefix activations, the index."""
    import faiss
    import numpy as np

    np.testing.assert_array_equal(np.asarray(actual.features), np.asarray(expected.features))
    np.testing.assert_array_equal(np.asarray(actual.gradient_keys), np.asarray(expected.gradient_keys))
    assert (actual.prefix_store is None) == (expected.prefix_store is None)
    if expected.prefix_store is not None:
        np.testing.assert_array_equal(np.asarray(actual.prefix_store.flat), np.asarray(expected.prefix_store.flat))
        np.testing.assert_array_equal(actual.prefix_store.offsets, expected.prefix_store.offsets)
    assert faiss.serialize_index(actual.index).tobytes() == faiss.serialize_index(expected.index).tobytes()


def assert_same_curvature(actual, expected) -> None:
    """Two engines' spectra and EK-FAC factors are equal to the bit (the workers' and one process's: the same
    sample, the same arithmetic)."""
    assert actual.spectrum() == expected.spectrum()
    mine, theirs = actual.factors(), expected.factors()
    assert mine.examples == theirs.examples and sorted(mine.kronecker) == sorted(theirs.kronecker)
    for position, block in theirs.kronecker.items():
        for part in ("q_a", "eig_a", "q_g", "eig_g", "corrected"):
            assert torch.equal(getattr(mine.kronecker[position], part), getattr(block, part)), part
    assert all(torch.equal(mine.diagonal[p], d) for p, d in theirs.diagonal.items())
