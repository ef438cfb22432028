"""An influence graph between test inputs and training examples, as JSON and as a picture.

Nodes are the test inputs and the training examples that influence them most;
an edge joins a training example to a test input with the influence score as
its weight (negative = helpful, positive = harmful). The picture is drawn with
matplotlib's Agg and SVG back ends (no display needed) on a layout of its own:
test inputs on an inner ring, the inputs of one group side by side; each training
example on an outer ring, in the direction of the inputs it influences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..engine import InfluenceEngine
from ..query import Query, Solver, TensorCache
from ..progress import ProgressCallback

HELPFUL_COLOUR = "#1a9850"
HARMFUL_COLOUR = "#d73027"
GROUP_COLOURS = ["#4575b4", "#f46d43", "#762a83", "#01665e", "#8c510a", "#c51b7d", "#35978f", "#525252"]


def input_node_id(index: int) -> str:
    return f"input-{index}"


def train_node_id(index: int) -> str:
    return f"train-{index}"


def influence_graph(
    engine: InfluenceEngine,
    queries: Sequence[Query],
    groups: Sequence[str | None] | None = None,
    *,
    k: int | None,
    top: int,
    threshold: float | None = None,
    solver: Solver,
    cache: TensorCache | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict:
    """Nodes and edges: per input, its ``top`` most helpful and ``top`` most harmful training examples.

    With ``threshold``, only edges with |score| ≥ threshold are kept. An input
    without a group is grouped by the label its influence is taken for.
    """
    encoded, influences = engine.analyze(queries, k=k, solver=solver, group=False, cache=cache, on_progress=on_progress)
    labels = engine.classifier.labels
    groups = list(groups) if groups is not None else [None] * len(queries)
    nodes: list[dict] = []
    edges: list[dict] = []
    train_nodes: dict[int, dict] = {}
    for i, (query, influence) in enumerate(zip(queries, influences)):
        probs = encoded.probs[i]
        label_used = labels[encoded.labels_used[i]]
        nodes.append({
            "id": input_node_id(i), "kind": "input", "input_index": i, "text": query.text, "text_pair": query.text_pair,
            "group": groups[i] if groups[i] is not None else label_used,
            "prediction": {"label": labels[int(probs.argmax())], "probs": {n: float(p) for n, p in zip(labels, probs)}},
            "label_used": label_used,
        })
        helpful, harmful = influence.ranked(top)
        for sign, positions in (("helpful", helpful), ("harmful", harmful)):
            for pos in positions:
                score = float(influence.scores[pos])
                if threshold is not None and abs(score) < threshold:
                    continue
                train_index = int(influence.indices[pos])
                if train_index not in train_nodes:
                    example = engine.train[train_index]
                    train_nodes[train_index] = {
                        "id": train_node_id(train_index), "kind": "train", "train_index": train_index,
                        "text": example.text, "text_pair": example.text_pair, "label": labels[example.label],
                    }
                edges.append({"source": train_node_id(train_index), "target": input_node_id(i), "score": score,
                              "sign": sign, "weight": abs(score)})
    for node in train_nodes.values():
        touching = [e for e in edges if e["source"] == node["id"]]
        node["degree"] = len(touching)
        node["total_score"] = float(sum(e["score"] for e in touching))
    nodes.extend(train_nodes[i] for i in sorted(train_nodes))
    group_names = list(dict.fromkeys(n["group"] for n in nodes if n["kind"] == "input"))
    return {"nodes": nodes, "edges": edges, "groups": group_names,
            "settings": {"k": k, "top": top, "threshold": threshold},
            "diagnostics": {"lissa_converged": all(inf.converged for inf in influences),
                            "s_test_norms": [float(inf.s_test_norm) for inf in influences]}}


# -- layout ---------------------------------------------------------------------------------
def layout(graph: dict) -> dict[str, tuple[float, float]]:
    """Positions of every node: inputs on a ring of radius 1 grouped, training examples on radius ~2.3."""
    inputs = [n for n in graph["nodes"] if n["kind"] == "input"]
    trains = [n for n in graph["nodes"] if n["kind"] == "train"]
    positions: dict[str, tuple[float, float]] = {}
    angles: dict[str, float] = {}
    if len(inputs) == 1:
        positions[inputs[0]["id"]] = (0.0, 0.0)
    else:
        # Each group an arc of its own, with a gap of one slot between groups.
        order = sorted(inputs, key=lambda n: (graph["groups"].index(n["group"]), n["input_index"]))
        slots, previous = [], None
        for node in order:
            if previous is not None and node["group"] != previous:
                slots.append(None)
            slots.append(node)
            previous = node["group"]
        if len(graph["groups"]) > 1:
            slots.append(None)
        step = 2 * math.pi / len(slots)
        for s, node in enumerate(slots):
            if node is not None:
                angles[node["id"]] = math.pi / 2 - s * step
                positions[node["id"]] = (math.cos(angles[node["id"]]), math.sin(angles[node["id"]]))
    # Training examples: towards the weighted mean direction of the inputs they influence.
    targets: list[tuple[float, str]] = []
    for node in trains:
        touching = [e for e in graph["edges"] if e["source"] == node["id"]]
        x = sum(e["weight"] * positions[e["target"]][0] for e in touching)
        y = sum(e["weight"] * positions[e["target"]][1] for e in touching)
        if len(inputs) == 1 or math.hypot(x, y) < 1e-12:
            # One input in the middle: helpful examples on the left half, harmful on the right, strongest first.
            total = node.get("total_score", 0.0)
            targets.append((math.pi + 1e-3 * node["train_index"] if total <= 0 else 1e-3 * node["train_index"], node["id"]))
        else:
            targets.append((math.atan2(y, x), node["id"]))
    placed = _spread(sorted(targets), min_gap=2 * math.pi / max(len(targets), 1) * 0.9)
    for rank, (angle, node_id) in enumerate(placed):
        radius = 2.3 + (0.22 if rank % 2 else 0.0)
        positions[node_id] = (radius * math.cos(angle), radius * math.sin(angle))
    return positions


def _spread(targets: list[tuple[float, str]], min_gap: float) -> list[tuple[float, str]]:
    """Angles at least ``min_gap`` apart, each as close to its target as a sweep allows."""
    if len(targets) < 2:
        return targets
    min_gap = min(min_gap, math.radians(25))
    angles = [a for a, _ in targets]
    for i in range(1, len(angles)):
        angles[i] = max(angles[i], angles[i - 1] + min_gap)
    overflow = angles[-1] - (angles[0] + 2 * math.pi - min_gap)
    if overflow > 0:  # the sweep wrapped past the first: shift everything back evenly
        angles = [a - overflow * (i / (len(angles) - 1)) for i, a in enumerate(angles)]
    return [(a, node_id) for a, (_, node_id) in zip(angles, targets)]


def _short(text: str, limit: int = 34) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(graph: dict, png_path: Path | None = None, svg_path: Path | None = None, title: str | None = None) -> None:
    """Draw the graph to PNG and/or SVG. Each node's SVG group has id ``node-<node id>``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    positions = layout(graph)
    nodes = {n["id"]: n for n in graph["nodes"]}
    group_colour = {g: GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, g in enumerate(graph["groups"])}
    figure = Figure(figsize=(11, 11), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.set_aspect("equal")
    ax.axis("off")
    biggest = max((e["weight"] for e in graph["edges"]), default=1.0) or 1.0
    for edge in graph["edges"]:
        (x0, y0), (x1, y1) = positions[edge["source"]], positions[edge["target"]]
        colour = HELPFUL_COLOUR if edge["sign"] == "helpful" else HARMFUL_COLOUR
        ax.plot([x0, x1], [y0, y1], color=colour, alpha=0.65, linewidth=0.6 + 4.0 * edge["weight"] / biggest,
                zorder=1, gid=f"edge-{edge['source']}-{edge['target']}")
    for node_id, node in nodes.items():
        x, y = positions[node_id]
        if node["kind"] == "input":
            ax.plot([x], [y], marker="s", markersize=17, color=group_colour[node["group"]], markeredgecolor="black",
                    zorder=3, gid=f"node-{node_id}", linestyle="none")
            ax.annotate(f"#{node['input_index']} {_short(node['text'], 28)}\npred: {node['prediction']['label']}",
                        (x, y), xytext=(0, -22), textcoords="offset points", ha="center", va="top", fontsize=8,
                        zorder=4, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
        else:
            fill = HELPFUL_COLOUR if node.get("total_score", 0.0) < 0 else HARMFUL_COLOUR
            ax.plot([x], [y], marker="o", markersize=9, color="white", markeredgecolor=fill, markeredgewidth=2,
                    zorder=3, gid=f"node-{node_id}", linestyle="none")
            angle = math.atan2(y, x)
            ha = "left" if math.cos(angle) > 0.2 else ("right" if math.cos(angle) < -0.2 else "center")
            ax.annotate(f"[{node['train_index']}] {node['label']}: {_short(node['text'])}", (x, y),
                        xytext=(9 * math.cos(angle), 9 * math.sin(angle)), textcoords="offset points",
                        ha=ha, va="center", fontsize=7, zorder=4)
    legend = [
        Line2D([0], [0], color=HELPFUL_COLOUR, linewidth=3, label="helpful (score < 0)"),
        Line2D([0], [0], color=HARMFUL_COLOUR, linewidth=3, label="harmful (score > 0)"),
        Line2D([0], [0], marker="o", color="white", markeredgecolor="black", markersize=9, linestyle="none",
               label="training example"),
    ] + [Line2D([0], [0], marker="s", color=group_colour[g], markeredgecolor="black", markersize=11, linestyle="none",
                label=f"test input, group {g}") for g in graph["groups"]]
    ax.legend(handles=legend, loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_xlim(-3.6, 3.6)
    ax.set_ylim(-3.4, 3.4)
    ax.set_title(title or f"Influence graph: {sum(1 for n in nodes.values() if n['kind'] == 'input')} inputs, "
                 f"{sum(1 for n in nodes.values() if n['kind'] == 'train')} training examples, {len(graph['edges'])} edges",
                 fontsize=11)
    figure.tight_layout()
    for path, fmt in ((png_path, "png"), (svg_path, "svg")):
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            figure.savefig(partial, format=fmt)
            partial.replace(path)  # readers never see half a file


def positions_array(graph: dict) -> np.ndarray:
    """The layout as an array in node order (for tests and callers that draw it themselves)."""
    positions = layout(graph)
    return np.array([positions[n["id"]] for n in graph["nodes"]], dtype=np.float64)
