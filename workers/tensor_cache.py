"""Per-test gradients and s_test in Redis: safetensors bytes (dtype and shape kept, no pickle).

Keys are content-addressed, ``fastif:v1:{model_fp}:{kind}:{sha256(payload)}``, so a
changed model, parameter selection or training set never reads a stale entry.
"""

from __future__ import annotations

import redis
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from records.keys import cache_key


class RedisTensorCache:
    """The engine's ``TensorCache`` protocol over Redis, with a TTL on every entry."""

    def __init__(self, client: redis.Redis, model_fp: str, ttl_s: int):
        self.client = client
        self.model_fp = model_fp
        self.ttl_s = ttl_s

    # A cache: while Redis is away it misses and forgets, and the job goes on computing.

    def get(self, kind: str, payload: dict) -> torch.Tensor | None:
        try:
            raw = self.client.get(cache_key(self.model_fp, kind, payload))
        except redis.RedisError:
            return None
        return None if raw is None else load_tensors(raw)["tensor"]

    def put(self, kind: str, payload: dict, tensor: torch.Tensor) -> None:
        data = save_tensors({"tensor": tensor.detach().to("cpu").contiguous()})
        try:
            self.client.set(cache_key(self.model_fp, kind, payload), data, ex=self.ttl_s)
        except redis.RedisError:
            pass
