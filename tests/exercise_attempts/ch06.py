"""Chapter 06 (paged KV): known shortcuts and plausible wrong answers, each a full solution cell."""

_ALLOC_BM = '''
from kvlab.engine.block_manager import FreeBlockQueue


class BlockAllocator:
    def __init__(self, num_blocks):
        self.q, self.used = FreeBlockQueue(range(num_blocks)), set()

    @property
    def num_free(self):
        return len(self.q)

    def allocate(self):
        b = self.q.popleft()
        self.used.add(b)
        return b

    def release(self, block_id):
        if block_id not in self.used:
            raise ValueError(block_id)
        self.used.remove(block_id)
        self.q.append(block_id)
'''

_ALLOC_LIFO = '''
class BlockAllocator:
    def __init__(self, num_blocks):
        self.free, self.used = list(range(num_blocks)), set()

    @property
    def num_free(self):
        return len(self.free)

    def allocate(self):
        if not self.free:
            raise RuntimeError("empty")
        b = self.free.pop()
        self.used.add(b)
        return b

    def release(self, block_id):
        if block_id not in self.used:
            raise ValueError(block_id)
        self.used.remove(block_id)
        self.free.append(block_id)
'''

_ALLOC_NO_CHECK = '''
import collections


class BlockAllocator:
    def __init__(self, num_blocks):
        self.free = collections.deque(range(num_blocks))

    @property
    def num_free(self):
        return len(self.free)

    def allocate(self):
        if not self.free:
            raise RuntimeError("empty")
        return self.free.popleft()

    def release(self, block_id):
        self.free.append(block_id)
'''

_PAGED_HEAD = '''
import math

import torch


def paged_attention(q, k_cache, v_cache, block_table, context_len, scale=None):
    q_len, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    blocks = torch.as_tensor(list(block_table)[:-(-context_len // block_size)], dtype=torch.long)
    k = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:context_len].to(q.dtype)
    v = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:context_len].to(q.dtype)
    group = num_heads // kv_heads
'''
_PAGED_TAIL = '''
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(context_len - q_len, context_len).view(-1, 1)
    scores = scores.masked_fill(torch.arange(context_len).view(1, -1) > q_pos, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)
'''

_ATTEND = '''
import torch


def paged_attend(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, context_lens, block_tables, scale):
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    {write}
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, L in enumerate(context_lens.tolist()):
        rows = slice(starts[s], starts[s + 1])
        out[rows] = paged_attention(q[rows], k_cache, v_cache, block_tables[s].tolist(), {ctx}, scale)
    return out
'''
_WRITE = ("k_cache.view(num_blocks * block_size, kv_heads, head_dim)[slot_mapping] = k\n"
          "    v_cache.view(num_blocks * block_size, kv_heads, head_dim)[slot_mapping] = v")

ATTEMPTS = {
    "q1_allocator": {
        "shortcuts": [_ALLOC_BM],
        "wrong": [_ALLOC_LIFO, _ALLOC_NO_CHECK],
    },
    "q2_slot_mapping": {
        "shortcuts": ['''
import torch
from kvlab.engine.model_runner import ModelRunner


def slot_mapping(block_table, positions, block_size):
    class _Seq:
        num_computed_tokens, num_scheduled_tokens, seq_id = 0, 0, 0
    s = _Seq()
    s.block_table, s.token_ids = list(block_table), [0] * (max(positions) + 1)
    s.__class__.__len__ = lambda self: len(self.token_ids)

    class _C:
        device = "cpu"
    _C.block_size = block_size
    slots = ModelRunner(None, _C()).prepare([s])[2].slot_mapping.tolist()
    return [slots[p] for p in positions]
'''],
        "wrong": [
            '''
def slot_mapping(block_table, positions, block_size):
    return [block_table[p // block_size] + p % block_size for p in positions]
''',
            '''
def slot_mapping(block_table, positions, block_size):
    return [block_table[p // block_size] * block_size + p // block_size for p in positions]
''',
            '''
def slot_mapping(block_table, positions, block_size):
    return [p // block_size * block_size + p % block_size for p in positions]
''',
        ],
    },
    "q3_paged_attention": {
        "shortcuts": [
            '''
import math

import torch

from kvlab.attention.paged_torch import paged_prefill_attention


def paged_attention(q, k_cache, v_cache, block_table, context_len, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return paged_prefill_attention(q, k_cache, v_cache, torch.tensor([list(block_table)], dtype=torch.int32),
                                   torch.tensor([0, q.shape[0]], dtype=torch.int32),
                                   torch.tensor([context_len], dtype=torch.int32), scale)
''',
            _PAGED_HEAD + '''
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    qs, ks, vs = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    q_pos = torch.arange(context_len - q_len, context_len).view(-1, 1)
    mask = torch.arange(context_len).view(1, -1) <= q_pos
    o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)
''',
        ],
        "wrong": [
            # the causal mask as if the queries started at position 0
            _PAGED_HEAD + '''
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(q_len).view(-1, 1)
    scores = scores.masked_fill(torch.arange(context_len).view(1, -1) > q_pos, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)
''',
            # query head h reads KV head h % kv_heads (repeat instead of repeat_interleave)
            _PAGED_HEAD + '''
    k, v = k.repeat(1, group, 1), v.repeat(1, group, 1)
''' + _PAGED_TAIL,
            # the scale ignored: always 1 / sqrt(head_dim)
            _PAGED_HEAD.replace("if scale is None else scale", "") + '''
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
''' + _PAGED_TAIL,
            # every block of the table read, garbage included: no cut at context_len
            _PAGED_HEAD.replace("[:context_len].to", ".to").replace(
                "list(block_table)[:-(-context_len // block_size)]", "list(block_table)") + '''
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    context_len = k.shape[0]
''' + _PAGED_TAIL,
        ],
    },
    "q4_paged_engine": {
        "shortcuts": ['''
from kvlab.attention import paged_torch


def paged_attend(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, context_lens, block_tables, scale):
    paged_torch.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    return paged_torch.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                               context_lens, scale)
'''],
        "wrong": [
            # attention first, then the write: the new tokens do not see themselves
            _ATTEND.replace("    {write}\n", "").replace("    return out", "    " + _WRITE + "\n    return out")
            .replace("{ctx}", "L"),
            # the context taken as the new tokens only
            _ATTEND.replace("{write}", _WRITE).replace("{ctx}", "starts[s + 1] - starts[s]"),
            # nothing written into the pools
            _ATTEND.replace("    {write}\n", "").replace("{ctx}", "L"),
        ],
    },
}
