"""Chapter 07 (continuous batching): known shortcuts and plausible wrong answers, each a full solution cell."""

_ADMIT = '''
def admit(waiting, block_manager, running, num_tokens, max_num_seqs, max_num_batched_tokens):
    admitted = []
    while waiting and len(running) < max_num_seqs:
        seq = waiting[0]
        if {fits}:
            {stop}
        waiting.popleft()
        block_manager.allocate(seq)
        running.append(seq)
        admitted.append(seq)
        num_tokens += {cost}
    return admitted
'''
_FITS = "num_tokens + len(seq) > max_num_batched_tokens or not block_manager.can_allocate(seq)"


def _admit(fits=_FITS, stop="break", cost="len(seq) - seq.num_cached_tokens"):
    return _ADMIT.replace("{fits}", fits).replace("{stop}", stop).replace("{cost}", cost)


_STEP = '''
def schedule_step(running, waiting, block_manager, max_num_seqs, max_num_batched_tokens):
    decodes, preempted = [], []
    for seq in list(running):
        if seq not in running:
            continue
        while not block_manager.can_append(seq):
            victim = {victim}
            block_manager.deallocate(victim)
            running.remove(victim)
            waiting.{requeue}(victim)
            preempted.append(victim)
            if victim is seq:
                break
        else:
            block_manager.may_append(seq)
            decodes.append(seq)
    prefills = []
    if {gate}:
        prefills = admit(waiting, block_manager, running, {used}, max_num_seqs, max_num_batched_tokens)
    return decodes, prefills, preempted
'''


def _step(victim="running[-1]", requeue="appendleft", gate="not preempted or not decodes", used="len(decodes)"):
    return (_STEP.replace("{victim}", victim).replace("{requeue}", requeue).replace("{gate}", gate)
            .replace("{used}", used))


ATTEMPTS = {
    "q1_shortest_prompt_first": {
        "shortcuts": ['''
from kvlab.lab.batching import shortest_prompt_first
'''],
        "wrong": [
            '''
def shortest_prompt_first(waiting):
    return sorted(waiting, key=len)
''',
            '''
def shortest_prompt_first(waiting):
    return sorted(waiting, key=lambda seq: -seq.num_prompt_tokens)[::-1]
''',
        ],
    },
    "q2_admit": {
        "shortcuts": ['''
from kvlab.engine.scheduler import Scheduler


def admit(waiting, block_manager, running, num_tokens, max_num_seqs, max_num_batched_tokens):
    s = Scheduler(block_manager, max_num_seqs, max_num_batched_tokens)
    s.running, s.waiting = list(running), waiting
    before = len(s.running)
    s.schedule()
    new = s.running[before:]
    running.extend(new)
    return new
'''],
        "wrong": [
            _admit(cost="len(seq)"),                                   # prefix hits charged to the budget
            '''
def admit(waiting, block_manager, running, num_tokens, max_num_seqs, max_num_batched_tokens):
    admitted = []
    for seq in list(waiting):                                 # overtaking: skips a head that does not fit
        if len(running) >= max_num_seqs:
            break
        if num_tokens + len(seq) > max_num_batched_tokens or not block_manager.can_allocate(seq):
            continue
        waiting.remove(seq)
        block_manager.allocate(seq)
        running.append(seq)
        admitted.append(seq)
        num_tokens += len(seq) - seq.num_cached_tokens
    return admitted
''',
            _admit(fits="num_tokens + len(seq) >= max_num_batched_tokens or not block_manager.can_allocate(seq)"),
            _admit(fits="num_tokens + len(seq) > max_num_batched_tokens"),   # no block check
        ],
    },
    "q3_schedule_step": {
        "shortcuts": ['''
from kvlab.engine.scheduler import Scheduler


def schedule_step(running, waiting, block_manager, max_num_seqs, max_num_batched_tokens):
    s = Scheduler(block_manager, max_num_seqs, max_num_batched_tokens)
    s.running, s.waiting = running, waiting
    out = s.schedule()
    return [q for q in out if q.num_scheduled_tokens == 1 and q.num_computed_tokens], [], []
'''],
        "wrong": [
            _step(victim="running[0]"),                                # the oldest is the victim
            _step(requeue="append"),                                   # victim to the back of the queue
            _step(victim="seq"),                                       # the one being served is the victim
            _step(used="0"),                                           # decodes not counted in the budget
        ],
    },
}
