"""Where KV-cache memory goes: a request trace replayed against contiguous reservation and against paging.

Every KV slot a serving system sets aside for a request is, at any moment, one of (Kwon et al., 2023, §3):

- **used**: it holds the K and V of a token the request has seen;
- **future**: reserved for a token the request will produce later (used eventually, idle now);
- **never used** (internal fragmentation): reserved for the request, but it finishes before filling it;
- **external fragmentation**: free, yet no waiting request can have it, because the free memory is split
  into holes smaller than the piece the request needs.

The schemes compared:

- `Contiguous("max")`: reserve `max_model_len` slots in one piece when a request is admitted, because its
  output length is unknown (FasterTransformer; "Orca (Max)" in Kwon et al., 2023).
- `Contiguous("exact")`: reserve exactly prompt + output slots, an oracle that knows the output length
  ("Orca (Oracle)"). No real system can do this, and with pieces of different sizes it fragments
  externally (first-fit allocation in one linear arena).
- `Paged(block_size)`: hand out fixed-size blocks one at a time as a sequence grows, from a free list
  (Kwon et al., 2023). Any free block fits any request, so there is no external fragmentation; the
  only idle slots are the unfilled tail of each sequence's last block, fewer than `block_size`.

The replay is a step simulator, no tensors: one step is one forward pass of the engine. A request
admitted at step s holds prompt + k tokens after its k-th step (the prompt and the first output token in
the first step, one more token per step after that) and finishes after `output_len` steps. Admission
is first come, first served: the queue stops at the first request that does not fit. When a paged
sequence needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed (vLLM's recompute preemption).

Reference: W. Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from kvlab.lab.traces import Request


@dataclass(frozen=True)
class Contiguous:
    """One contiguous piece per request: `max_model_len` slots ("max") or prompt + output ("exact")."""
    reserve: str = "max"

    def __post_init__(self):
        if self.reserve not in ("max", "exact"):
            raise ValueError(f"Contiguous.reserve must be 'max' or 'exact', got {self.reserve!r}")

    @property
    def name(self) -> str:
        return "contiguous (max_model_len)" if self.reserve == "max" else "contiguous (oracle: exact length)"


@dataclass(frozen=True)
class Paged:
    """Blocks of `block_size` slots, allocated one at a time as the sequence grows."""
    block_size: int

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"Paged.block_size must be >= 1, got {self.block_size}")

    @property
    def name(self) -> str:
        return f"paged, block {self.block_size}"


@dataclass
class _Seq:
    req: Request
    k: int = 0                     # steps done = output tokens produced
    start: int = -1                # contiguous: first slot of the reservation
    size: int = 0                  # contiguous: slots reserved
    blocks: list = field(default_factory=list)  # paged: physical block ids, in order

    @property
    def used(self) -> int:
        return self.req.prompt_len + self.k


@dataclass
class Replay:
    """Per-step token counts of one replay. Arrays have one entry per step; all counts are in slots."""
    scheme: str
    pool_tokens: int
    unit: int                      # slots per unit of `owners` (block size; 1 for contiguous)
    used: np.ndarray
    allocated: np.ndarray
    future: np.ndarray
    never_used: np.ndarray
    external: np.ndarray
    running: np.ndarray
    waiting: np.ndarray
    preemptions: int
    admit_step: dict               # request_id -> step of its last admission
    finish_step: dict              # request_id -> step it finished
    owners: np.ndarray | None = None   # [steps, units] request id owning each unit, -1 free
    fill: np.ndarray | None = None     # [steps, units] tokens held in each unit

    @property
    def num_steps(self) -> int:
        return len(self.used)

    def summary(self) -> dict:
        """Token-step totals as percentages of the allocated (or pooled) token-steps."""
        alloc, pool = self.allocated.sum(), self.pool_tokens * self.num_steps
        pct = lambda x: 100.0 * float(x) / float(alloc) if alloc else 0.0
        return {
            "scheme": self.scheme,
            "waste_pct": pct(alloc - self.used.sum()),          # allocated but not holding a token
            "future_pct": pct(self.future.sum()),
            "internal_frag_pct": pct(self.never_used.sum()),
            "external_frag_pct_of_pool": 100.0 * float(self.external.sum()) / pool,
            "pool_used_pct": 100.0 * float(self.used.sum()) / pool,
            "mean_running": float(self.running.mean()),
            "max_running": int(self.running.max()),
            "steps": self.num_steps,
            "preemptions": self.preemptions,
        }


def _arena_alloc(holes: list, size: int) -> int | None:
    """First fit: the lowest-addressed hole that is big enough; None if no hole is."""
    for i, (start, length) in enumerate(holes):
        if length >= size:
            holes[i] = (start + size, length - size)
            if length == size:
                holes.pop(i)
            return start
    return None


def _arena_free(holes: list, start: int, size: int) -> None:
    """Return [start, start + size) to the sorted hole list, merging it with touching neighbours."""
    holes.append((start, size))
    holes.sort()
    merged = []
    for s, n in holes:
        if merged and merged[-1][0] + merged[-1][1] == s:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((s, n))
    holes[:] = merged


def replay(trace: list[Request], scheme: Contiguous | Paged, pool_tokens: int, max_model_len: int,
           step_seconds: float = 0.02, max_num_seqs: int | None = None,
           record_owners: bool = False) -> Replay:
    """Replay `trace` against `scheme` with `pool_tokens` KV slots; see the module docstring for the model.

    A request arriving at `arrival_time` seconds joins the queue at step floor(arrival_time / step_seconds).
    `record_owners=True` also records which request owns each block (paged) or slot (contiguous) at every
    step, for pictures of the pool; keep the pool small then.
    """
    if pool_tokens <= 0:
        raise ValueError(f"pool_tokens must be > 0, got {pool_tokens}")
    if not step_seconds > 0:
        raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
    if max_num_seqs is not None and max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1 or None, got {max_num_seqs}")
    paged = isinstance(scheme, Paged)
    bs = scheme.block_size if paged else 1
    num_units = pool_tokens // bs
    if paged and num_units == 0:
        raise ValueError(f"pool_tokens ({pool_tokens}) holds no block of block_size {bs}")

    def need(r: Request, tokens: int) -> int:  # units a request holding `tokens` tokens needs
        if paged:
            return -(-tokens // bs)
        return max_model_len if scheme.reserve == "max" else r.total_len

    for r in trace:
        if r.total_len > max_model_len:
            raise ValueError(f"request {r.request_id}: prompt + output = {r.total_len} tokens exceeds "
                             f"max_model_len={max_model_len}")
        if need(r, r.total_len) > num_units:
            raise ValueError(f"request {r.request_id} ({r.total_len} tokens) can never fit in a pool of "
                             f"{pool_tokens} slots with {scheme.name}")

    pending = deque(sorted(trace, key=lambda r: (r.arrival_time, r.request_id)))
    waiting: deque[_Seq] = deque()
    running: list[_Seq] = []
    free_blocks = deque(range(num_units))          # paged: FIFO free list of block ids
    holes = [(0, pool_tokens)]                     # contiguous: free [start, length) pieces
    rec = {k: [] for k in ("used", "allocated", "future", "never_used", "external", "running", "waiting")}
    owners, fill = [], []
    admit_step, finish_step = {}, {}
    preemptions, step = 0, 0
    last_arrival = int(trace[-1].arrival_time / step_seconds) if trace else 0
    step_limit = 10 * sum(r.total_len for r in trace) + last_arrival + 10

    while pending or waiting or running:
        if step > step_limit:
            raise RuntimeError("replay did not finish; this is a bug in the simulator")
        while pending and int(pending[0].arrival_time / step_seconds) <= step:
            waiting.append(_Seq(pending.popleft()))
        external = 0
        while waiting and (max_num_seqs is None or len(running) < max_num_seqs):
            seq = waiting[0]
            if paged:
                n = need(seq.req, seq.req.prompt_len + 1)
                if n > len(free_blocks):
                    break
                seq.blocks = [free_blocks.popleft() for _ in range(n)]
            else:
                n = need(seq.req, 0)
                start = _arena_alloc(holes, n)
                if start is None:
                    free = sum(length for _, length in holes)
                    external = free if free >= n else 0
                    break
                seq.start, seq.size = start, n
            running.append(waiting.popleft())
            admit_step[seq.req.request_id] = step
        i = 0
        while i < len(running):                     # every running sequence takes one step
            seq = running[i]
            seq.k += 1
            preempted_self = False
            while paged and len(seq.blocks) < need(seq.req, seq.used):
                if free_blocks:
                    seq.blocks.append(free_blocks.popleft())
                    continue
                victim = running.pop()              # the most recently admitted sequence
                free_blocks.extend(victim.blocks)
                victim.blocks, victim.k = [], 0
                waiting.appendleft(victim)
                preemptions += 1
                if victim is seq:
                    preempted_self = True
                    break
            if not preempted_self:
                i += 1
        # Account this step, then release the sequences that just produced their last token.
        used = alloc = fut = never = 0
        for seq in running:
            a = len(seq.blocks) * bs if paged else seq.size
            used += seq.used
            alloc += a
            fut += min(a, seq.req.total_len) - seq.used
            never += a - min(a, seq.req.total_len)
        for key, val in zip(rec, (used, alloc, fut, never, external, len(running), len(waiting))):
            rec[key].append(val)
        if record_owners:
            own, fl = np.full(num_units, -1, dtype=np.int32), np.zeros(num_units, dtype=np.int32)
            for seq in running:
                if paged:
                    for j, b in enumerate(seq.blocks):
                        own[b] = seq.req.request_id
                        fl[b] = min(bs, max(0, seq.used - j * bs))
                else:
                    own[seq.start:seq.start + seq.size] = seq.req.request_id
                    fl[seq.start:seq.start + seq.used] = 1
            owners.append(own)
            fill.append(fl)
        still = []
        for seq in running:
            if seq.k >= seq.req.output_len:
                finish_step[seq.req.request_id] = step
                if paged:
                    free_blocks.extend(seq.blocks)
                else:
                    _arena_free(holes, seq.start, seq.size)
            else:
                still.append(seq)
        running = still
        step += 1

    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in rec.items()}
    return Replay(scheme.name, pool_tokens, bs, preemptions=preemptions, admit_step=admit_step,
                  finish_step=finish_step, owners=np.stack(owners) if record_owners and owners else None,
                  fill=np.stack(fill) if record_owners and fill else None, **arrays)


def slots_per_session(trace: list[Request], block_size: int | None = None) -> float:
    """Time-averaged KV slots one session holds while it runs, over the trace's requests.

    A request holds prompt + k tokens during its k-th step, rounded up to whole blocks when paged, so
    averaged over every running step of every request this is sum_i sum_k slots_i(k) / sum_i output_i.
    By Little's law a pool of N slots then holds N / slots_per_session sessions on average. Dividing by
    the mean *final* length instead, as back-of-envelope estimates do, ignores both that a session is
    short for most of its life and that long answers stay resident longer.
    """
    if not trace:
        raise ValueError("trace is empty")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
    bs = block_size or 1
    total_slots = total_steps = 0
    for r in trace:
        held = r.prompt_len + np.arange(1, r.output_len + 1)
        total_slots += int((-(-held // bs) * bs).sum())
        total_steps += r.output_len
    return total_slots / total_steps


def sessions_per_gpu(pool_tokens: int, trace: list[Request], max_model_len: int,
                     block_size: int) -> dict:
    """How many sessions a pool of `pool_tokens` KV slots serves at once, three ways.

    - `contiguous`: floor(pool / max_model_len), each session reserves the maximum;
    - `naive_paged`: pool / mean final length (the common back-of-envelope number);
    - `paged`: pool / `slots_per_session(trace, block_size)`, the time average with block rounding.
    """
    if pool_tokens <= 0:
        raise ValueError(f"pool_tokens must be > 0, got {pool_tokens}")
    if max_model_len <= 0:
        raise ValueError(f"max_model_len must be > 0, got {max_model_len}")
    mean_final = float(np.mean([r.total_len for r in trace]))
    return {
        "contiguous": pool_tokens // max_model_len,
        "naive_paged": pool_tokens / mean_final,
        "paged": pool_tokens / slots_per_session(trace, block_size),
    }


def pool_tokens_for(gpu_bytes: float, weight_bytes: float, kv_bytes_per_token: float,
                    utilization: float = 0.9, activation_bytes: float = 0.0) -> int:
    """KV slots left on a device: utilization * memory - weights - activation workspace, in tokens.
    0.9 is vLLM's default `gpu_memory_utilization`; the activation workspace is a stated assumption."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if kv_bytes_per_token <= 0:
        raise ValueError(f"kv_bytes_per_token must be > 0, got {kv_bytes_per_token}")
    free = gpu_bytes * utilization - weight_bytes - activation_bytes
    if free <= 0:
        raise ValueError(f"no memory left for the KV cache: {gpu_bytes:.3g} B x {utilization} - weights "
                         f"{weight_bytes:.3g} B - activations {activation_bytes:.3g} B <= 0")
    return int(math.floor(free / kv_bytes_per_token))
