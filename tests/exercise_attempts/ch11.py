"""Chapter 11 (the engine): known shortcuts and plausible wrong answers, each a full solution cell."""

_PREP = '''
def prepare_step(seqs, block_size):
    input_ids, positions, slots, qsl, ctx = [], [], [], [0], []
    for seq in seqs:
        start = {start}
        end = start + seq.num_scheduled_tokens
        input_ids += seq.token_ids[start:end]
        positions += list(range(start, end))
        slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        qsl.append(qsl[-1] + end - start)
        ctx.append({ctx})
    width = max(len(s.block_table) for s in seqs)
    tables = [list(s.block_table) + [-1] * (width - len(s.block_table)) for s in seqs]
    return dict(input_ids=input_ids, positions=positions, slot_mapping=slots, query_start_loc=qsl,
                context_lens=ctx, block_tables=tables, logit_indices={logits})
'''


def _prep(start="seq.num_computed_tokens", ctx="end", logits="[q - 1 for q in qsl[1:]]"):
    return _PREP.replace("{start}", start).replace("{ctx}", ctx).replace("{logits}", logits)


_STEP = '''
def engine_step(parts):
    seqs = parts.scheduler.schedule()
    if not seqs:
        return []
    logits = parts.forward(prepare_step(seqs, parts.block_size))
    for seq in seqs:
        {advance}
        seq.num_scheduled_tokens = 0
    done = [i for i, s in enumerate(seqs) if {done}]
    seqs = [seqs[i] for i in done]
    if not seqs:
        return []
    tokens = parts.sample(logits[done], seqs)
    out = []
    for seq, tok in zip(seqs, tokens):
        seq.append_token(tok)
        reason = parts.stop_reason(seq)
        if reason is not None:
            {finish}
        out.append((seq, tok))
    return out
'''


def _step(advance="seq.num_computed_tokens += seq.num_scheduled_tokens",
          done="s.num_computed_tokens == len(s)", finish="parts.finish(seq, reason)"):
    return _STEP.replace("{advance}", advance).replace("{done}", done).replace("{finish}", finish)


ATTEMPTS = {
    "q1_prepare_step": {
        "shortcuts": ['''
from kvlab.engine.model_runner import ModelRunner


def prepare_step(seqs, block_size):
    class _Pool:
        device = "cpu"
    _Pool.block_size = block_size
    ids, pos, meta, li = ModelRunner(None, _Pool()).prepare(seqs)
    return dict(input_ids=ids[0].tolist(), positions=pos[0].tolist(), slot_mapping=meta.slot_mapping.tolist(),
                query_start_loc=meta.query_start_loc.tolist(), context_lens=meta.context_lens.tolist(),
                block_tables=meta.block_tables.tolist(), logit_indices=li.tolist())
'''],
        "wrong": [
            _prep(start="0"),                                  # recomputes the whole sequence
            _prep(ctx="end - start"),                          # context = the new tokens only
            _prep(logits="qsl[:-1]"),                          # the first new token's logits
        ],
    },
    "q2_engine_step": {
        "shortcuts": ['''
def engine_step(parts):
    return parts.llm.__class__._step(parts.llm)
''', '''
from kvlab.engine.model_runner import ModelRunner


def engine_step(parts):
    llm = parts.llm
    seqs = parts.scheduler.schedule()
    if not seqs:
        return []
    logits = ModelRunner(llm.model, llm.cache).run(seqs)
    done = [i for i, s in enumerate(seqs) if s.num_computed_tokens == len(s)]
    seqs = [seqs[i] for i in done]
    if not seqs:
        return []
    out = []
    for seq, tok in zip(seqs, parts.sample(logits[done], seqs)):
        seq.append_token(tok)
        reason = parts.stop_reason(seq)
        if reason is not None:
            parts.finish(seq, reason)
        out.append((seq, tok))
    return out
'''],
        "wrong": [
            _step(done="True"),                                           # samples mid-prompt chunks too
            _step(advance="seq.num_computed_tokens = len(seq)"),          # a chunk counted as the whole prompt
            _step(finish="pass"),                                         # never finishes a request
        ],
    },
    "q3_latencies": {
        "shortcuts": ['''
from kvlab.engine.metrics import EngineMetrics
from kvlab.engine.sequence import Sequence


def latencies(arrival, token_times):
    s = Sequence([0], arrival_time=arrival)
    s.token_ids += [0] * len(token_times)
    s.first_token_time, s.finish_time = token_times[0], token_times[-1]
    m = EngineMetrics()
    m.observe_finished(s)
    tpot = m.time_per_output_token_seconds.sum if len(token_times) > 1 else float("nan")
    return m.time_to_first_token_seconds.sum, tpot, m.e2e_request_latency_seconds.sum
'''],
        "wrong": [
            '''
def latencies(arrival, token_times):
    n, first, last = len(token_times), token_times[0], token_times[-1]
    tpot = (last - first) / n if n > 1 else float("nan")
    return first - arrival, tpot, last - arrival
''',
            '''
def latencies(arrival, token_times):
    n, first, last = len(token_times), token_times[0], token_times[-1]
    tpot = (last - arrival) / n if n > 1 else float("nan")
    return first - arrival, tpot, last - arrival
''',
        ],
    },
}
