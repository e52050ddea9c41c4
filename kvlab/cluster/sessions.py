"""Multi-turn chat traces with shared system prompts: the workload a prefix cache is for.

`kvlab.lab.traces` draws independent requests with lengths only. Prefix caching, eviction and
prefix-aware routing need *token ids*, and the sharing that real chat traffic has:

- **shared system prompts**: every session starts with one of `num_system_prompts` fixed prompts,
  picked with Zipf popularity (prompt k has weight 1 / k^zipf_s), as applications with one
  instruction prompt per product would;
- **multi-turn history**: turn t's prompt is the session's previous prompt, the previous answer
  and a new user message, so consecutive turns share everything but the newest message.

Sessions arrive as a Poisson process; the gap between a session's turns is exponential
(`think_time`, the user reading and typing). Lengths are log-normal (`kvlab.lab.traces.LogNormalLengths`).
Defaults: user messages and answers use the LMSYS-Chat-1M means (69.5 and 214.5 tokens per prompt
and response; Zheng et al., 2023, "LMSYS-Chat-1M", Table 1), which also reports 2.0 turns per
conversation on average: the default `mean_turns` is that. Turns per session are geometric. The
system prompt lengths, Zipf exponent, think time and sigmas are modelling choices, not data.

Token ids are random integers in [0, vocab_size): two unrelated messages share a 16-token block
with negligible probability, so all sharing comes from the structure above. Same arguments, same
trace.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvlab.lab.traces import LogNormalLengths


@dataclass(frozen=True)
class ChatRequest:
    """One turn of one session. `prompt` is everything the model reads (system prompt, history,
    new message); `output` the tokens it answers with (they become part of the next turn's prompt)."""
    request_id: int
    session_id: int
    turn: int
    arrival_time: float
    system_id: int
    prompt: tuple
    output: tuple

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def output_len(self) -> int:
        return len(self.output)

    @property
    def tokens(self) -> tuple:
        """Prompt then output: what the KV cache holds when the request finishes."""
        return self.prompt + self.output


@dataclass(frozen=True)
class ChatWorkload:
    """The knobs of a chat trace (see the module docstring for which ones are published numbers)."""
    num_sessions: int = 200
    session_rate: float = 2.0          # sessions starting per second
    mean_turns: float = 2.0            # geometric turns per session (LMSYS-Chat-1M mean: 2.0)
    think_time: float = 20.0           # mean seconds between a session's turns
    num_system_prompts: int = 8
    zipf_s: float = 1.0
    system_len: LogNormalLengths = LogNormalLengths(400.0, 0.5, 16, 2048)
    user_len: LogNormalLengths = LogNormalLengths(69.5, 1.0, 1, 1024)
    output_len: LogNormalLengths = LogNormalLengths(214.5, 0.8, 1, 1024)
    max_context: int = 8192            # a session ends before its prompt + answer would exceed this
    vocab_size: int = 32000

    def __post_init__(self):
        if self.num_sessions <= 0:
            raise ValueError(f"num_sessions must be > 0, got {self.num_sessions}")
        if not self.session_rate > 0:
            raise ValueError(f"session_rate must be > 0 sessions/s, got {self.session_rate}")
        if not self.mean_turns >= 1:
            raise ValueError(f"mean_turns must be >= 1, got {self.mean_turns}")
        if not self.think_time >= 0:
            raise ValueError(f"think_time must be >= 0 s, got {self.think_time}")
        if self.num_system_prompts <= 0:
            raise ValueError(f"num_system_prompts must be > 0, got {self.num_system_prompts}")
        if not self.zipf_s >= 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")
        if self.max_context < self.system_len.max_len + 2:
            raise ValueError(f"max_context ({self.max_context}) must exceed the longest system prompt "
                             f"({self.system_len.max_len}) by at least 2 tokens")


def make_chat_trace(workload: ChatWorkload = ChatWorkload(), seed: int = 0) -> list[ChatRequest]:
    """Draw every turn of every session, sorted by arrival time (ties by session, then turn)."""
    w = workload
    rng = np.random.default_rng(seed)
    r_sys, r_sess, r_tok = (np.random.default_rng(s) for s in rng.integers(0, 2**63 - 1, size=3))
    sys_lens = w.system_len.sample(w.num_system_prompts, r_sys)
    systems = [tuple(int(t) for t in r_sys.integers(0, w.vocab_size, size=n)) for n in sys_lens]
    weights = 1.0 / np.arange(1, w.num_system_prompts + 1) ** w.zipf_s
    starts = np.cumsum(r_sess.exponential(1.0 / w.session_rate, size=w.num_sessions))
    sys_ids = r_sess.choice(w.num_system_prompts, size=w.num_sessions, p=weights / weights.sum())
    turns = r_sess.geometric(1.0 / w.mean_turns, size=w.num_sessions)

    out: list[tuple] = []
    for s in range(w.num_sessions):
        history, t = systems[sys_ids[s]], float(starts[s])
        for turn in range(int(turns[s])):
            user = int(w.user_len.sample(1, r_tok)[0])
            answer = int(w.output_len.sample(1, r_tok)[0])
            if len(history) + user + answer > w.max_context:
                break
            prompt = history + tuple(int(x) for x in r_tok.integers(0, w.vocab_size, size=user))
            output = tuple(int(x) for x in r_tok.integers(0, w.vocab_size, size=answer))
            out.append((t, s, turn, int(sys_ids[s]), prompt, output))
            history = prompt + output
            t += float(r_tok.exponential(w.think_time)) if w.think_time > 0 else 0.0
    out.sort(key=lambda x: (x[0], x[1], x[2]))
    return [ChatRequest(i, s, turn, t, k, p, o) for i, (t, s, turn, k, p, o) in enumerate(out)]


class BlockKeys:
    """Exact names for prefix blocks: block i of a sequence is named by (name of block i - 1, its
    block_size tokens), interned to a small int. Two sequences get the same name for block i iff
    their first (i + 1) x block_size tokens are equal, with no hash collisions possible.
    `parent[name]` is the name of the block before it (-1 for a first block)."""

    def __init__(self, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self._ids: dict[tuple, int] = {}
        self.parent: list[int] = []

    def __len__(self) -> int:
        return len(self.parent)

    def of(self, tokens) -> list[int]:
        """Names of the full blocks of `tokens` (a partial last block has none)."""
        names, prev, bs = [], -1, self.block_size
        for i in range(len(tokens) // bs):
            key = (prev, tuple(tokens[i * bs:(i + 1) * bs]))
            name = self._ids.get(key)
            if name is None:
                name = self._ids[key] = len(self.parent)
                self.parent.append(prev)
            names.append(name)
            prev = name
        return names


def sharing_stats(trace: list[ChatRequest], block_size: int = 16) -> dict:
    """Upper bounds any cache can reach on `trace`: the fraction of prompt tokens (in full blocks,
    the last prompt token always computed) that an earlier request already had in its prompt or
    output, i.e. the hit rate of an infinite prefix cache."""
    if not trace:
        raise ValueError("trace is empty")
    keys, seen, hit, total = BlockKeys(block_size), set(), 0, 0
    for r in sorted(trace, key=lambda r: r.arrival_time):
        names = keys.of(r.prompt[:r.prompt_len - 1])
        n = 0
        while n < len(names) and names[n] in seen:
            n += 1
        hit += n * block_size
        total += r.prompt_len
        seen.update(keys.of(r.tokens))
    return {"requests": len(trace), "prompt_tokens": total, "infinite_cache_hit_rate": hit / total,
            "distinct_blocks": len(keys)}
