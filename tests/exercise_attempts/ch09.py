"""Chapter 09 (KV quantization): known shortcuts and plausible wrong answers, each a full solution cell."""

_INT8 = '''
import torch


def quantize_int8_per_token(x):
    x = x.float()
    scale = (x.abs().amax(dim={axis}) / {qmax}).clamp_min(1e-8)
    q = {rnd}(x / scale.unsqueeze({axis})).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_per_token(q, scale):
    return q.float() * scale.unsqueeze({axis})
'''


def _int8(axis="-1", qmax="127", rnd="torch.round"):
    return _INT8.replace("{axis}", axis).replace("{qmax}", qmax).replace("{rnd}", rnd)


_KEYS = '''
import torch


def quantize_keys(k, bits=4):
    levels = 2 ** bits - 1
    k = k.float()
    zero = k.amin(dim={axis})
    scale = ((k.amax(dim={axis}) - zero) / {levels}).clamp_min(1e-8)
    q = torch.round((k - zero) / scale).clamp(0, levels).to(torch.uint8)
    per_byte = 8 // bits
    packed = torch.zeros(*q.shape[:-1], q.shape[-1] // per_byte, dtype=torch.uint8)
    for i in range(per_byte):
        packed |= q[..., i::per_byte] << ({shift})
    return packed, scale, zero


def dequantize_keys(packed, scale, zero, bits=4):
    per_byte, mask = 8 // bits, 2 ** bits - 1
    q = torch.stack([(packed >> ({shift})) & mask for i in range(per_byte)], dim=-1).flatten(-2)
    return q.float() * scale + zero
'''


def _keys(axis="0", levels="levels", shift="i * bits"):
    return _KEYS.replace("{axis}", axis).replace("{levels}", levels).replace("{shift}", shift)


_H2O = '''
import torch


def keep_top_and_recent(scores, budget, recent):
    n = scores.shape[-1]
    if n <= budget:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    older = {older}
    top = {top}
    tail = {tail}.expand(*scores.shape[:-1], recent)
    return {ret}
'''


def _h2o(older="scores[..., :n - recent]",
         top="torch.sort(older, dim=-1, descending=True, stable=True).indices[..., :budget - recent]",
         tail="torch.arange(n - recent, n)", ret="torch.sort(torch.cat([top, tail], dim=-1), dim=-1).values"):
    return _H2O.replace("{older}", older).replace("{top}", top).replace("{tail}", tail).replace("{ret}", ret)


_ATTEND = '''
import torch

from kvlab.cache.base import causal_attention


def int8_paged_attend(q, k, v, k_codes, k_scales, v_codes, v_scales, slot_mapping, query_start_loc,
                      context_lens, block_tables, scale):
    NB, BS, H, D = k_codes.shape
    for new, codes, scales in ((k, k_codes, k_scales), (v, v_codes, v_scales)):
        c, s = quantize_int8_per_token(new)
        codes.view(NB * BS, H, D)[slot_mapping] = c
        scales.view(NB * BS, H)[slot_mapping] = s
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, L in enumerate(context_lens.tolist()):
        blocks = block_tables[i, :-(-L // BS)].long()
        kk = {kk}
        vv = dequantize_int8_per_token(v_codes[blocks], v_scales[blocks]).reshape(-1, H, D)[:L].to(q.dtype)
        rows = slice(starts[i], starts[i + 1])
        n = starts[i + 1] - starts[i]
        qq = q[rows] * ({qscale})
        out[rows] = causal_attention(qq[None], kk[None], vv[None], q_offset={off})[0]
    return out
'''
_KK = "dequantize_int8_per_token(k_codes[blocks], k_scales[blocks]).reshape(-1, H, D)[:L].to(q.dtype)"


def _attend(kk=_KK, qscale="scale * D ** 0.5", off="L - n"):
    return _ATTEND.replace("{kk}", kk).replace("{qscale}", qscale).replace("{off}", off)


ATTEMPTS = {
    "q1_int8_per_token": {
        "shortcuts": ['''
import torch

from kvlab.quant.int8 import quantize_int8


def quantize_int8_per_token(x):
    q, s = quantize_int8(x)
    return q, s.float()


def dequantize_int8_per_token(q, scale):
    return q.float() * scale.unsqueeze(-1)
'''],
        "wrong": [
            _int8(qmax="100"),                  # a wrong scale: the top codes are never used
            _int8(rnd="torch.trunc"),           # truncation instead of rounding
            _int8(qmax="255"),                  # half the code range
        ],
    },
    "q2_kivi_keys": {
        "shortcuts": ['''
import torch

from kvlab.quant import int4


def quantize_keys(k, bits=4):
    p, s, z = int4.quantize_keys(k, bits)
    return p, s.float(), z.float()


def dequantize_keys(packed, scale, zero, bits=4):
    return int4.dequantize_keys(packed, scale, zero, bits=bits)
'''],
        "wrong": [
            _keys(axis="-1"),                   # per token instead of per channel
            _keys(levels="2 ** bits"),          # off by one: 16 steps for 16 codes
            _keys(shift="(per_byte - 1 - i) * bits"),   # the even channel in the high nibble
        ],
    },
    "q4_h2o_keep": {
        "shortcuts": [
            '''
from kvlab.evict.policy import keep_top_and_recent as _kvlab


def keep_top_and_recent(scores, budget, recent):
    return _kvlab(scores, budget, recent)
''',
            '''
from kvlab.evict.policy import EvictionConfig, select_keep


def keep_top_and_recent(scores, budget, recent):
    cfg = EvictionConfig("h2o", budget, recent=min(recent, budget - 1))
    return select_keep(cfg, scores.shape[-1], scores=scores, shape=scores.shape[:-1])
'''],
        "wrong": [
            _h2o(older="scores"),                           # the recent entries compete for the top too
            _h2o(top="(n - recent - 1) - torch.sort(older.flip(-1), dim=-1, descending=True, "
                     "stable=True).indices[..., :budget - recent]"),   # ties: the later entry wins
            _h2o(ret="torch.cat([top, tail], dim=-1)"),     # not in ascending order
            _h2o(tail="torch.arange(n - recent - 1, n - 1)"),   # the window one entry too early
        ],
    },
    "q3_int8_cache": {
        "shortcuts": ['''
import torch

from kvlab.quant import int8
from kvlab.attention.paged_torch import paged_prefill_attention


def int8_paged_attend(q, k, v, k_codes, k_scales, v_codes, v_scales, slot_mapping, query_start_loc,
                      context_lens, block_tables, scale):
    NB, BS, H, D = k_codes.shape
    for new, codes, scales in ((k, k_codes, k_scales), (v, v_codes, v_scales)):
        c, s = int8.quantize_int8(new)
        codes.view(NB * BS, H, D)[slot_mapping] = c
        scales.view(NB * BS, H)[slot_mapping] = s.float()
    kc = int8.dequantize_int8(k_codes, k_scales)
    vc = int8.dequantize_int8(v_codes, v_scales)
    return paged_prefill_attention(q, kc, vc, block_tables, query_start_loc, context_lens, scale)
'''],
        "wrong": [
            _attend(kk="k_codes[blocks].float().reshape(-1, H, D)[:L].to(q.dtype)"),   # codes without scales
            _attend(qscale="1.0"),                                                     # the scale argument ignored
            _attend(off="0"),                                                          # queries as if at position 0
        ],
    },
}
