"""The influence graph's layout and pictures, on a hand-made graph (no model, no stack)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from fastif.applications.graph import layout, render


def _graph() -> dict:
    """Two groups of two inputs; each training example influences the inputs of one group only."""
    nodes = [{"id": f"input-{i}", "kind": "input", "input_index": i, "text": f"input {i}", "group": g,
              "prediction": {"label": "positive", "probs": {"negative": 0.2, "positive": 0.8}}, "label_used": "positive"}
             for i, g in enumerate(["a", "a", "b", "b"])]
    edges = []
    for t in range(8):
        targets = (0, 1) if t < 4 else (2, 3)
        score = -0.5 if t % 2 else 0.3
        for target in targets:
            edges.append({"source": f"train-{t}", "target": f"input-{target}", "score": score,
                          "sign": "helpful" if score < 0 else "harmful", "weight": abs(score)})
        nodes.append({"id": f"train-{t}", "kind": "train", "train_index": t, "text": f"training example {t}",
                      "label": "positive", "degree": 2, "total_score": 2 * score})
    return {"nodes": nodes, "edges": edges, "groups": ["a", "b"]}


def test_inputs_of_a_group_sit_together_and_examples_near_their_inputs():
    graph = _graph()
    pos = layout(graph)
    dist = lambda a, b: math.dist(pos[a], pos[b])  # noqa: E731
    assert dist("input-0", "input-1") < min(dist("input-0", "input-2"), dist("input-1", "input-3"))
    assert dist("input-2", "input-3") < min(dist("input-2", "input-0"), dist("input-3", "input-1"))
    for t in range(8):
        own, other = ((0, 1), (2, 3)) if t < 4 else ((2, 3), (0, 1))
        near = min(dist(f"train-{t}", f"input-{i}") for i in own)
        far = min(dist(f"train-{t}", f"input-{i}") for i in other)
        assert near < far, t
    # No two training examples on top of each other.
    trains = [pos[f"train-{t}"] for t in range(8)]
    assert min(math.dist(a, b) for i, a in enumerate(trains) for b in trains[i + 1:]) > 0.3


def test_single_input_puts_helpful_and_harmful_on_opposite_sides():
    graph = _graph()
    graph["nodes"] = [n for n in graph["nodes"] if n["kind"] == "train" or n["id"] == "input-0"]
    graph["edges"] = [e for e in graph["edges"] if e["target"] == "input-0"]
    graph["nodes"] = [n for n in graph["nodes"] if n["kind"] == "input" or n["id"] in {e["source"] for e in graph["edges"]}]
    graph["groups"] = ["a"]
    pos = layout(graph)
    assert pos["input-0"] == (0.0, 0.0)
    helpful = [pos[e["source"]][0] for e in graph["edges"] if e["sign"] == "helpful"]
    harmful = [pos[e["source"]][0] for e in graph["edges"] if e["sign"] == "harmful"]
    assert max(helpful) < 0 < min(harmful)


def test_render_writes_a_png_and_an_svg_with_every_node(tmp_path):
    graph = _graph()
    render(graph, tmp_path / "g.png", tmp_path / "g.svg", title="test graph")
    data = (tmp_path / "g.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    tree = ET.parse(tmp_path / "g.svg").getroot()
    ids = {el.get("id") for el in tree.iter() if el.get("id")}
    assert {f"node-{n['id']}" for n in graph["nodes"]} <= ids
    assert {f"edge-{e['source']}-{e['target']}" for e in graph["edges"]} <= ids
    assert not list(tmp_path.glob("*.partial"))
