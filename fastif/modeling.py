"""Loading a Hugging Face sequence classifier the way influence computations need it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .errors import ModelLoadError


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if given, else CUDA when present, else CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Classifier:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]  # label names in id order
    device: torch.device
    path: Path

    @property
    def label2id(self) -> dict[str, int]:
        return {name: idx for idx, name in enumerate(self.labels)}


def load_classifier(path: str | Path, device: str | torch.device | None = None) -> Classifier:
    """Load weights from safetensors only, with eager attention.

    Eager attention because PyTorch's SDPA kernels on CPU have neither double
    backward nor forward-mode AD, and influence needs both (HVPs, JVP scoring).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: no .safetensors weights (other weight formats are refused: they can run code)")
    # Weight-loading bars and load reports would interleave with our own output.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation="eager", use_safetensors=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path}: cannot load the classifier ({err})") from None
    device = torch.device(device) if device is not None else pick_device()
    model.to(device).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return Classifier(model=model, tokenizer=tokenizer, labels=labels, device=device, path=path)


def output_layer(model: PreTrainedModel) -> nn.Linear:
    """The layer that produces the logits: the last ``nn.Linear`` with one output per label."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == model.config.num_labels]
    if not found:
        raise ModelLoadError(f"{type(model).__name__}: no linear output layer with {model.config.num_labels} outputs")
    return found[-1]
