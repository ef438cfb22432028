"""Per-test gradients and s_test in Redis: safetensors bytes (dtype and shape kept, no pickle), within a byte budget.

Keys are content-addressed, ``fastif:v1:{model_fp}:{kind}:{sha256(payload)}``, so a
changed model, parameter selection or training set never reads a stale entry.

Each entry is as large as the influence parameters (8 MB on MiniLM's top), so a day's TTL alone
would let a busy service fill Redis, where job records and results live too. Every entry is
therefore also on a shared index (``fastif:tensor-cache:*``: the entries by last use, their sizes
and their total), and a write that takes the total past ``max_bytes`` evicts the least recently used
first, in one transaction (the SET and a Lua script) so that concurrent workers keep the total exact. An entry deleted some other
way (its TTL, a deleted model) stays counted until the index reaches it, then goes at no cost.
"""

from __future__ import annotations

import time

import redis
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from records.keys import PREFIX, cache_key

INDEX = f"{PREFIX}:tensor-cache"

# The entry's bytes are SET beside the script, in one transaction, not passed through it: Lua copies an argument
# twice (into a Lua string, then out of it), and a put of MiniLM's 7.7 MB took 24 ms that way against 6 ms.
# KEYS: the entry, the order of use (a sorted set), the sizes (a hash), the total. ARGV: the entry's size, now, max bytes.
_INDEX_PUT = """
local previous = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
redis.call('HSET', KEYS[3], KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
local total = redis.call('INCRBY', KEYS[4], tonumber(ARGV[1]) - previous)
local evicted = 0
while total > tonumber(ARGV[3]) do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then break end
  total = redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], oldest[1]) or '0'))
  redis.call('HDEL', KEYS[3], oldest[1])
  redis.call('DEL', oldest[1])
  evicted = evicted + 1
end
return evicted
"""


class RedisTensorCache:
    """The engine's ``TensorCache`` protocol over Redis: a TTL on every entry, and at most ``max_bytes`` in all."""

    def __init__(self, client: redis.Redis, model_fp: str, ttl_s: int, max_bytes: int):
        self.client = client
        self.model_fp = model_fp
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.order, self.sizes, self.total = (f"{INDEX}:{part}" for part in ("order", "sizes", "bytes"))
        self._index_put = client.register_script(_INDEX_PUT)

    # A cache: while Redis is away it misses and forgets, and the job goes on computing.

    def get(self, kind: str, payload: dict) -> torch.Tensor | None:
        key = cache_key(self.model_fp, kind, payload)
        try:
            # One round trip: marked recently used (evicted last), which changes nothing for a key not on the index.
            raw, _ = self.client.pipeline(transaction=False).get(key).zadd(self.order, {key: time.time()}, xx=True).execute()
        except redis.RedisError:
            return None
        return None if raw is None else load_tensors(raw)["tensor"]

    def put(self, kind: str, payload: dict, tensor: torch.Tensor) -> None:
        data = save_tensors({"tensor": tensor.detach().to("cpu").contiguous()})
        if len(data) > self.max_bytes:
            return  # it would evict everything and still not fit
        key = cache_key(self.model_fp, kind, payload)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.set(key, data, ex=self.ttl_s)
                self._index_put(keys=[key, self.order, self.sizes, self.total],
                                args=[len(data), time.time(), self.max_bytes], client=pipe)
                pipe.execute()
        except redis.RedisError:
            pass
