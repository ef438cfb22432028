"""The demo's own labelled data: short product reviews, fixed seed, 5% planted mislabels."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

LABELS = ["negative", "positive"]
PRODUCTS = ["headphones", "blender", "coffee maker", "phone case", "desk lamp", "running shoes", "backpack",
            "kettle", "keyboard", "vacuum cleaner", "water bottle", "office chair", "smart watch", "toaster",
            "bluetooth speaker", "yoga mat", "air fryer", "umbrella", "monitor", "electric toothbrush"]
GOOD = ["works perfectly", "exceeded my expectations", "is sturdy and well made", "was worth every penny",
        "does exactly what it promises", "feels premium", "is easy to use", "arrived quickly and works great",
        "is the best purchase I made this year", "looks beautiful on my desk", "is comfortable all day",
        "is quiet and powerful", "has held up for months", "is a great value"]
BAD = ["stopped working after a week", "feels cheap and flimsy", "broke on the first day", "is a waste of money",
       "arrived damaged", "is far too loud", "never charged properly", "fell apart within a month",
       "is uncomfortable to use", "smells of burnt plastic", "is nothing like the photos", "died after two uses",
       "is impossible to clean", "leaks everywhere"]
GOOD_EXTRA = ["I would buy it again.", "Highly recommended.", "My whole family loves it.", "Five stars.",
              "Delivery was fast too.", "Great customer service as well."]
BAD_EXTRA = ["I am returning it.", "Do not buy this.", "Customer service never replied.", "One star.",
             "Very disappointed.", "Save your money."]
OPENERS = ["This", "The", "My new", "Our", "Honestly, this", "So far the"]


@dataclass(frozen=True)
class DemoData:
    train: list[dict]  # {"text", "label"}
    mislabelled: list[int]  # train indices whose label was flipped on purpose
    test: list[dict]


def _review(rng: random.Random, positive: bool) -> str:
    phrase = rng.choice(GOOD if positive else BAD)
    extra = rng.choice(GOOD_EXTRA if positive else BAD_EXTRA) if rng.random() < 0.6 else ""
    text = f"{rng.choice(OPENERS)} {rng.choice(PRODUCTS)} {phrase}. {extra}".strip()
    if rng.random() < 0.15:  # a contrast: the clause after "but" decides
        text = f"{rng.choice(OPENERS)} {rng.choice(PRODUCTS)} {rng.choice(BAD if positive else GOOD)}, but it {phrase}."
    return text


def make_demo_data(count: int = 3000, noise: float = 0.05, seed: int = 13) -> DemoData:
    rng = random.Random(seed)
    train, mislabelled = [], []
    for index in range(count):
        positive = rng.random() < 0.5
        label = int(positive)
        if rng.random() < noise:
            label = 1 - label
            mislabelled.append(index)
        train.append({"text": _review(rng, positive), "label": LABELS[label]})
    test = [
        {"text": "The keyboard works perfectly. Highly recommended.", "label": "positive"},
        {"text": "This kettle leaks everywhere. I am returning it.", "label": "negative"},
        {"text": "The monitor looks beautiful, but it died after two uses.", "label": "negative"},
        {"text": "My new backpack feels cheap, but it has held up for months.", "label": "positive"},
        {"text": "Honestly, this toaster is not a waste of money at all.", "label": "positive"},
        {"text": "Great, another blender that smells of burnt plastic.", "label": "negative"},
    ]
    return DemoData(train=train, mislabelled=mislabelled, test=test)


def write_train(path: Path, data: DemoData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in data.train))
