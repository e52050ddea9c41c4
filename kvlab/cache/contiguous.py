"""Contiguous KV caches: keep every past key and value of a sequence in one tensor per layer.

Why a cache works at all: with a causal mask, the key and value of token i depend only on tokens
0..i. A new token never changes them, so recomputing them at every step (what `NoCache` does) is
pure waste. Store them once; each decode step then computes k, v for the one new token only.

Two ways to store them, so the cost of reallocation is visible:

- `ContiguousKVCache` preallocates `[batch, kv_heads, max_len, head_dim]` per layer for keys and
  for values and keeps a length pointer per row. A step writes T new columns in place; nothing is
  copied. This is what Hugging Face's `StaticCache` does, and what a paged cache refines.
- `ConcatKVCache` starts empty and grows with `torch.cat` at every step. Each step allocates a new
  tensor and copies the whole past into it: O(n) bytes moved per step, O(n^2) over a generation.

Both implement the protocol in `kvlab.cache.base` and use `causal_attention` there, the reference.
Both take `sliding_windows` (one entry per layer, None = full attention; `for_model` passes the
model config's): a windowed layer's query sees only the last W positions up to itself. They still
keep every token (the window is a mask here; a cache that drops old tokens is kvlab.evict's).
"""
from __future__ import annotations

import torch

from kvlab.cache.base import causal_attention, check_sliding_windows, layer_window


def _check_kv(layer: int, num_layers: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "q [B, T, Hq, D] and k, v [B, T, Hkv, D]")


class ContiguousKVCache:
    """Preallocated keys and values, `[batch, kv_heads, max_len, head_dim]` per layer.

    `lengths[b]` is how many tokens row b holds. Rows may hold different lengths (batched decoding
    of prompts of different lengths): a forward pass writes its T new tokens of row b at columns
    `lengths[b] .. lengths[b] + T - 1`, and row b's queries see only its own keys. Columns past a
    row's length hold stale values that the causal mask never lets a query see.

    `position_offset` tells the model where the new tokens sit (RoPE positions): an int when all
    rows are equally long, else a `[batch, 1]` tensor.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 sliding_windows=None):
        for name, val in (("num_layers", num_layers), ("batch", batch), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("max_len", max_len)):
            if val <= 0:
                raise ValueError(f"ContiguousKVCache: {name} must be positive, got {val}")
        self.num_layers, self.max_len = num_layers, max_len
        self.sliding_windows = check_sliding_windows(sliding_windows, num_layers, "ContiguousKVCache")
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model, batch: int = 1, max_len: int | None = None) -> ContiguousKVCache:
        """A cache shaped for `model` (a kvlab Llama), in the model's dtype and device."""
        c = model.config
        max_len = c.max_position_embeddings if max_len is None else max_len
        return cls(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_len,
                   dtype=model.dtype, device=model.device,
                   sliding_windows=getattr(c, "sliding_windows", None))

    @property
    def batch(self) -> int:
        return self.lengths.numel()

    @property
    def length(self) -> int:
        """The longest row's length (all rows' length when they are equal)."""
        return int(self.lengths.max())

    @property
    def position_offset(self) -> int | torch.Tensor:
        return int(self.lengths[0]) if self._uniform() else self.lengths.view(-1, 1)

    def _uniform(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())

    @property
    def nbytes(self) -> int:
        """Bytes the cache tensors hold (all of max_len: that is the point of preallocation)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def set_lengths(self, lengths) -> None:
        """Rewind rows to `lengths` (e.g. after a right-padded prefill, forget the pad tokens)."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device).reshape(-1)
        if lengths.numel() != self.batch:
            raise ValueError(f"lengths must have one entry per row ({self.batch}), got {lengths.numel()}")
        if bool((lengths < 0).any()) or bool((lengths > self.max_len).any()):
            raise ValueError(f"lengths must lie in [0, max_len={self.max_len}], got {lengths.tolist()}")
        self.lengths = lengths.clone()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_kv(layer, self.num_layers, q, k, v)
        B, T = k.shape[:2]
        if B != self.batch:
            raise ValueError(f"batch of the forward pass ({B}) != cache batch ({self.batch})")
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"cache is full: {self.length} tokens + {T} new > max_len={self.max_len}")
        kc, vc = self.k[layer], self.v[layer]
        if self._uniform():  # all rows equally long: one slice write
            start = int(self.lengths[0])
            kc[:, :, start:start + T] = k.transpose(1, 2)
            vc[:, :, start:start + T] = v.transpose(1, 2)
            q_offset = start
        else:
            for b in range(B):
                start = int(self.lengths[b])
                kc[b, :, start:start + T] = k[b].transpose(0, 1)
                vc[b, :, start:start + T] = v[b].transpose(0, 1)
            q_offset = self.lengths
        # [B, Hkv, end, D] -> the model's [B, end, Hkv, D] layout (a view, no copy)
        return causal_attention(q, kc[:, :, :end].transpose(1, 2), vc[:, :, :end].transpose(1, 2),
                                q_offset=q_offset, sliding_window=layer_window(self.sliding_windows, layer))

    def advance(self, num_tokens: int) -> None:
        self.lengths += num_tokens


class ConcatKVCache:
    """Keys and values that grow by `torch.cat`, `[batch, kv_heads, length, head_dim]` per layer.

    Simple and always exactly the right size, but every step reallocates and copies the whole
    past. All rows have the same length (no per-row lengths: there is no free column to reuse).
    """

    def __init__(self, num_layers: int, sliding_windows=None):
        if num_layers <= 0:
            raise ValueError(f"ConcatKVCache: num_layers must be positive, got {num_layers}")
        self.num_layers = num_layers
        self.sliding_windows = check_sliding_windows(sliding_windows, num_layers, "ConcatKVCache")
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    @classmethod
    def for_model(cls, model) -> ConcatKVCache:
        return cls(model.config.num_layers, getattr(model.config, "sliding_windows", None))

    @property
    def position_offset(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_kv(layer, self.num_layers, q, k, v)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k.contiguous(), v.contiguous()
        else:
            if self.k[layer].shape[0] != k.shape[0]:
                raise ValueError(f"batch of the forward pass ({k.shape[0]}) != cache batch "
                                 f"({self.k[layer].shape[0]})")
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)  # new tensor, the past is copied
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return causal_attention(q, self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2),
                                q_offset=self.length, sliding_window=layer_window(self.sliding_windows, layer))

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
