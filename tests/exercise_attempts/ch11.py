"""Chapter 11 (the engine): known shortcuts and plausible wrong answers, each a full solution cell."""

_PREP = '''
def prepare_step(chunks, block_size):
    input_ids, positions, slots, qsl, ctx = [], [], [], [0], []
    for c in chunks:
        seq, start, end = c.seq, {start}, c.start + c.num_tokens
        input_ids += seq.token_ids[start:end]
        positions += list(range(start, end))
        slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        qsl.append(qsl[-1] + end - start)
        ctx.append({ctx})
    width = max(len(c.seq.block_table) for c in chunks)
    tables = [list(c.seq.block_table) + [-1] * (width - len(c.seq.block_table)) for c in chunks]
    return dict(input_ids=input_ids, positions=positions, slot_mapping=slots, query_start_loc=qsl,
                context_lens=ctx, block_tables=tables, logit_indices={logits})
'''


def _prep(start="c.start", ctx="end", logits="[q - 1 for q in qsl[1:]]"):
    return _PREP.replace("{start}", start).replace("{ctx}", ctx).replace("{logits}", logits)


_STEP = '''
def engine_step(parts):
    chunks = parts.schedule()
    if not chunks:
        return []
    logits = parts.forward(prepare_step(chunks, parts.block_size))
    done = [i for i, c in enumerate(chunks) if {done}]
    if not done:
        return []
    seqs = [chunks[i].seq for i in done]
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


_STREAM = '''
class StreamText:
    def __init__(self, stop=None):
        self.sent = ""
        self.holdback = {holdback}

    def next(self, text, finished):
        if not finished:
            text = {strip}
            text = text[:max(len(self.sent), len(text) - self.holdback)]
        if {check}:
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
'''


def _stream(holdback="max((len(s) for s in stop or []), default=1) - 1", strip='text.rstrip("\\ufffd")',
            check="not text.startswith(self.sent)"):
    return _STREAM.replace("{holdback}", holdback).replace("{strip}", strip).replace("{check}", check)


def _step(done="c.end == len(c.seq)", finish="parts.finish(seq, reason)"):
    return _STEP.replace("{done}", done).replace("{finish}", finish)


ATTEMPTS = {
    "q1_prepare_step": {
        "shortcuts": ['''
from kvlab.course.fixtures import reference_prepare as prepare_step
''', '''
from kvlab.engine.model_runner import ModelRunner


def prepare_step(chunks, block_size):
    class _Pool:
        device = "cpu"
    _Pool.block_size = block_size
    ids, pos, meta, li = ModelRunner(None, _Pool()).prepare(chunks)
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
def engine_step(parts):                      # kvlab's own loop, under the plugged core
    step = type(parts.core).__mro__[1].step
    return [(o.seq, o.new_token_ids[0]) for o in step(parts.core) if o.new_token_ids]
''', '''
def engine_step(parts):                      # kvlab's runner packs the step
    chunks = parts.schedule()
    if not chunks:
        return []
    schedule = parts._schedule
    logits = parts.core.runner.run(schedule)
    seqs = [c.seq for c in chunks if c.end == len(c.seq)]
    out = []
    for seq, tok in zip(seqs, parts.sample(logits, seqs)):
        seq.append_token(tok)
        reason = parts.stop_reason(seq)
        if reason is not None:
            parts.finish(seq, reason)
        out.append((seq, tok))
    return out
'''],
        "wrong": [
            _step(done="True"),                                           # samples mid-prompt chunks too
            _step(done="c.start == 0"),                                   # only a prompt's first chunk samples
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
    "q4_stream_text": {
        "shortcuts": ['''
from kvlab.serve.protocol import StreamText
''', '''
from kvlab.serve import protocol


class StreamText(protocol.StreamText):
    pass
'''],
        "wrong": [
            _stream(holdback="max((len(s) for s in stop or []), default=0)"),   # holds back a whole stop string
            _stream(strip="text"),                                              # sends a partial character
            _stream(holdback="len(stop or [])"),                                # one character per stop string
            _stream(check="False"),                                             # may take sent text back
        ],
    },
}
