"""Chapter 10 (Triton kernels): known shortcuts and plausible wrong answers, each a full solution cell."""

_HEAD = '''
import torch
import triton
import triton.language as tl

'''

_LOAD = _HEAD + '''
@triton.jit
def load_block_kernel(cache_ptr, table_ptr, n_valid_ptr, out_ptr, h, H,
                      BLOCK_SIZE: tl.constexpr, D: tl.constexpr):
    i = tl.program_id(0)
    blk = tl.load(table_ptr + i)
    n = tl.load(n_valid_ptr + i)
    t = tl.arange(0, BLOCK_SIZE)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = {mask}
    x = tl.load(cache_ptr + {off}, mask=mask, other=0.0)
    tl.store(out_ptr + (i * BLOCK_SIZE + t) * D + d, x, mask={store_mask})
'''


def _load(mask="(t < n) & (d < D)", off="((blk * BLOCK_SIZE + t) * H + h) * D + d", store_mask="mask"):
    return _LOAD.replace("{mask}", mask).replace("{off}", off).replace("{store_mask}", store_mask)


_ONLINE = '''
import torch


def online_update(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.max())
    alpha = torch.exp(m - m_new)
    p = torch.exp(scores - m_new)
    return {ret}
'''

_MERGE = '''
import torch


def merge_partitions(o, lse):
    w = {w}
    return (w[:, None] * o).sum(0) / {den}
'''

_DECODE = _HEAD + '''
@triton.jit
def decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, out_ptr, scale, Hq, max_blocks,
                  GROUP: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    kvh = {kvh}
    ctx = tl.load(ctx_ptr + s)
    d = tl.arange(0, D)
    t = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + (s * Hq + h) * D + d).to(tl.float32)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for j in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
        blk = tl.load(table_ptr + s * max_blocks + j).to(tl.int64)
        valid = {valid}
        off = ((blk * BLOCK_SIZE + t[:, None]) * Hkv + kvh) * D + d[None, :]
        k = tl.load(k_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = {alpha}
        p = tl.exp(scores - m_new)
        v = tl.load(v_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    tl.store(out_ptr + (s * Hq + h) * D + d, (acc / l).to(out_ptr.dtype.element_ty))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    S, Hq, D = q.shape
    Hkv, BS = k_cache.shape[2], k_cache.shape[1]
    out = torch.zeros_like(q)
    decode_kernel[(S, Hq)](q, k_cache, v_cache, block_tables, context_lens, out, scale, Hq,
                           block_tables.shape[1], GROUP=Hq // Hkv, Hkv=Hkv, D=D, BLOCK_SIZE=BS)
    return out
'''


def _decode(kvh="h // GROUP", valid="j * BLOCK_SIZE + t < ctx", alpha="tl.exp(m - m_new)"):
    return _DECODE.replace("{kvh}", kvh).replace("{valid}", valid).replace("{alpha}", alpha)


_WRITE = _HEAD + """
@triton.jit
def cache_write_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, H,
                       BLOCK_SIZE: tl.constexpr, D: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    slot = tl.load(slot_ptr + n).to(tl.int64){shift}
    keep = {keep}
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    src = {src}
    dst = {dst}
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=keep), mask=keep)
    {store_v}


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    N, Hkv, D = k.shape
    cache_write_kernel[{grid}](k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping, Hkv,
                               BLOCK_SIZE=k_cache.shape[1], D=D)
"""


def _write(shift="", keep="(slot + 0 * d) >= 0", src="(n * H + h) * D + d",
           dst="((blk * BLOCK_SIZE + off) * H + h) * D + d",
           store_v="tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=keep), mask=keep)", grid="(N, Hkv)"):
    return (_WRITE.replace("{shift}", shift).replace("{keep}", keep).replace("{src}", src)
            .replace("{dst}", dst).replace("{store_v}", store_v).replace("{grid}", grid))


_WRITE_STUB = _HEAD + """
@triton.jit
def cache_write_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, H,
                       BLOCK_SIZE: tl.constexpr, D: tl.constexpr):
    n = tl.program_id(0)                   # launched, but writes nothing


"""


ATTEMPTS = {
    "q1_masked_load": {
        "shortcuts": [_HEAD + '''
@triton.jit
def _copy(cache_ptr, table_ptr, n_valid_ptr, out_ptr, h, H, BLOCK_SIZE: tl.constexpr, D: tl.constexpr):
    pass


class _Launcher:
    def __getitem__(self, grid):
        def run(cache, table, n_valid, out, h, H, BLOCK_SIZE, D):
            for i in range(grid[0]):                       # torch instead of a kernel
                n = int(n_valid[i])
                out[i, :n] = cache[int(table[i]), :n, h]
        return run


load_block_kernel = _Launcher()
'''],
        "wrong": [
            _load(mask="(t <= n) & (d < D)"),                                  # off by one row
            _load(off="((blk * BLOCK_SIZE + t) * H) * D + d"),                 # always head 0
            _load(store_mask="(d < D)"),                                       # writes the padding rows too
        ],
    },
    "q2_online_softmax": {
        "shortcuts": ['''
import torch


def online_update(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.max())
    lse_old = m + torch.log(l) if l > 0 else m
    lse = torch.logsumexp(torch.stack([lse_old, torch.logsumexp(scores, 0)]), 0)
    w = torch.softmax(torch.stack([lse_old, torch.logsumexp(scores, 0)]), 0)
    new = acc / l if l > 0 else torch.zeros_like(acc)
    out = w[0] * new + w[1] * (torch.softmax(scores, 0) @ v)
    l_new = torch.exp(lse - m_new)
    return m_new, l_new, out * l_new
'''],
        "wrong": [
            _ONLINE.replace("{ret}", "m_new, l + p.sum(), acc + p @ v"),                      # no rescaling
            _ONLINE.replace("{ret}", "m_new, l * alpha + p.sum(), acc + p @ v"),              # acc not rescaled
            _ONLINE.replace("{ret}", "m_new, l / alpha + p.sum(), acc / alpha + p @ v"),      # inverted factor
        ],
    },
    "q3_split_k_reduce": {
        "shortcuts": ['''
import torch


def merge_partitions(o, lse):
    return (torch.softmax(lse, 0)[:, None] * o).sum(0)
'''],
        "wrong": [
            _MERGE.replace("{w}", "torch.exp(lse)").replace("{den}", "w.sum()"),            # overflows
            _MERGE.replace("{w}", "torch.ones_like(lse)").replace("{den}", "len(lse)"),     # plain mean
            _MERGE.replace("{w}", "lse - lse.max()").replace("{den}", "w.sum()"),           # log weights
        ],
    },
    "q4_decode_kernel": {
        "shortcuts": ['''
import torch

from kvlab.kernels.decode_attention_v1 import paged_decode_attention_v1


class _Launcher:
    def __getitem__(self, grid):
        raise RuntimeError("never launched")


decode_kernel = _Launcher()


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    return paged_decode_attention_v1(q, k_cache, v_cache, block_tables, context_lens, scale)
'''],
        "wrong": [
            _decode(kvh="h % Hkv"),                                         # wrong GQA mapping
            _decode(valid="j * BLOCK_SIZE + t <= ctx"),                     # off by one: one token too many
            _decode(alpha="tl.exp(m_new - m)"),                             # inverted rescaling
        ],
    },
    "q5_cache_write": {
        "shortcuts": [
            _WRITE_STUB + """
from kvlab.attention.paged_torch import reshape_and_cache as _ref_write


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    cache_write_kernel[(1, 1)](k, v, k_cache, v_cache, slot_mapping, 1, BLOCK_SIZE=1, D=1)
    _ref_write(k, v, k_cache, v_cache, slot_mapping)         # kvlab's write
""",
            _WRITE_STUB + """
from kvlab.kernels.reshape_and_cache import reshape_and_cache as _kvlab_kernel


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    cache_write_kernel[(1, 1)](k, v, k_cache, v_cache, slot_mapping, 1, BLOCK_SIZE=1, D=1)
    _kvlab_kernel(k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping)   # kvlab's kernel
""",
            _WRITE_STUB + """
def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    cache_write_kernel[(1, 1)](k, v, k_cache, v_cache, slot_mapping, 1, BLOCK_SIZE=1, D=1)
    keep = slot_mapping >= 0
    NB, BS, H, D = k_cache.shape
    k_cache.view(NB * BS, H, D).index_copy_(0, slot_mapping[keep], k[keep].to(k_cache.dtype))
    v_cache.view(NB * BS, H, D).index_copy_(0, slot_mapping[keep], v[keep].to(v_cache.dtype))
""",
            _WRITE_STUB + """
def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    cache_write_kernel[(1, 1)](k, v, k_cache, v_cache, slot_mapping, 1, BLOCK_SIZE=1, D=1)
    keep = slot_mapping >= 0
    NB, BS, H, D = k_cache.shape
    k_cache.view(NB * BS, H, D)[slot_mapping[keep]] = k[keep].to(k_cache.dtype)   # index_put_
    v_cache.view(NB * BS, H, D)[slot_mapping[keep]] = v[keep].to(v_cache.dtype)
""",
            _WRITE_STUB + """
def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    cache_write_kernel[(1, 1)](k, v, k_cache, v_cache, slot_mapping, 1, BLOCK_SIZE=1, D=1)
    bs = k_cache.shape[1]
    for i, s in enumerate(slot_mapping.tolist()):             # torch, token by token, not the kernel
        if s >= 0:
            k_cache[s // bs, s % bs] = k[i]
            v_cache[s // bs, s % bs] = v[i]
""",
        ],
        "wrong": [
            _write(keep="d < D"),                                               # padding slots written too
            _write(shift=" + 1"),                                               # each token one slot too far
            _write(dst="((blk * H + h) * BLOCK_SIZE + off) * D + d"),           # head-major inside a block
            _write(src="n * H * D + d"),                                        # always head 0's row
            _write(store_v="pass"),                                             # values never written
            _write(grid="(N,)"),                                                # one head per token
            _write().replace("k.contiguous(), v.contiguous()", "k, v"),         # views read as if contiguous
        ],
    },
}
