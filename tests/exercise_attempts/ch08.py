"""Chapter 08 (prefix caching): known shortcuts and plausible wrong answers, each a full solution cell."""

_HASH = '''
import hashlib
import struct


def chain_hashes(token_ids, block_size, salt=None):
    out, parent = [], bytes(32)
    for i in range(len(token_ids) // block_size):
        tokens = token_ids[i * block_size:(i + 1) * block_size]
        extra = b""
        if {salted} and salt is not None:
            data = salt.encode("utf-8")
            extra = b"s" + struct.pack("<Q", len(data)) + data
        digest = hashlib.sha256({parent} + struct.pack(f"<Q{len(tokens)}q", len(tokens), *tokens) + extra).digest()
        out.append(digest)
        parent = digest
    return out
'''


def _hash(salted="i == 0", parent="parent"):
    return _HASH.replace("{salted}", salted).replace("{parent}", parent)


_QUEUE = '''
from collections import OrderedDict


class FreeQueue:
    def __init__(self, block_ids):
        self.q = OrderedDict((b, None) for b in block_ids)

    def __len__(self):
        return len(self.q)

    def pop_head(self):
        if not self.q:
            raise RuntimeError("no free block")
        return self.q.popitem(last={last})[0]

    def push_tail(self, b):
        self.q[b] = None

    def push_head(self, b):
        self.q[b] = None
        {head}

    def remove(self, b):
        del self.q[b]

    def free_sequence(self, block_table):
        for b in {order}(block_table):
            self.push_tail(b)

    def order(self):
        return list(self.q)
'''


def _queue(last="False", head="self.q.move_to_end(b, last=False)", order="reversed"):
    return _QUEUE.replace("{last}", last).replace("{head}", head).replace("{order}", order)


_LOOKUP = '''
def cached_prefix(block_manager, seq):
    bs = block_manager.block_size
    hashes = chain_hashes(list(seq.token_ids), bs, seq.cache_salt)
    hits, parent = [], bytes(32)
    for i in range({count}):
        block_id = block_manager.cached.get(hashes[i])
        if block_id is None:
            {miss}
        b = block_manager.blocks[block_id]
        extra = (seq.cache_salt,) if i == 0 and seq.cache_salt is not None else ()
        if {check}:
            {miss}
        hits.append(b)
        parent = hashes[i]
    return hits
'''
_CHECK = "(b.token_ids, b.extra_keys, b.parent_hash) != (tuple(seq.token_ids[i * bs:(i + 1) * bs]), extra, parent)"


def _lookup(count="(len(seq) - 1) // bs", miss="break", check=_CHECK):
    return _LOOKUP.replace("{count}", count).replace("{miss}", miss).replace("{check}", check)


ATTEMPTS = {
    "q1_chain_hash": {
        "shortcuts": ['''
from kvlab.engine.prefix_hash import block_hashes as chain_hashes
''', '''
from kvlab.engine.prefix_hash import ROOT, extra_keys_for, hash_block


def chain_hashes(token_ids, block_size, salt=None):
    out, parent = [], ROOT
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size],
                            extra_keys_for(salt) if i == 0 else ())
        out.append(parent)
    return out
'''],
        "wrong": [
            _hash(parent="bytes(32)"),          # no chain: every block hashed on its own
            _hash(salted="True"),               # the salt in every block
            _hash().replace('struct.pack(f"<Q{len(tokens)}q", len(tokens), *tokens)',
                            'struct.pack(f"<{len(tokens)}q", *tokens)'),   # no length prefix
        ],
    },
    "q2_lru_queue": {
        "shortcuts": ['''
from kvlab.engine.block_manager import FreeBlockQueue


class FreeQueue(FreeBlockQueue):
    def pop_head(self):
        return self.popleft()

    def push_tail(self, b):
        self.append(b)

    def push_head(self, b):
        self.appendleft(b)

    def free_sequence(self, block_table):
        for b in reversed(block_table):
            self.append(b)

    def order(self):
        return list(self)
'''],
        "wrong": [
            _queue(order="list"),                       # a finished sequence's first block evicted first
            _queue(last="True"),                        # hands out the most recently freed block (MRU)
            _queue(head="pass"),                        # push_head appends at the tail
        ],
    },
    "q3_prefix_lookup": {
        "shortcuts": ['''
from kvlab.engine.block_manager import BlockManager


def cached_prefix(block_manager, seq):
    return BlockManager._cached_prefix(block_manager, seq)
'''],
        "wrong": [
            _lookup(check="False"),                     # trusts the digest alone
            _lookup(count="len(seq) // bs"),            # may leave no token to compute
            _lookup(check="(b.token_ids, b.extra_keys) != (tuple(seq.token_ids[i * bs:(i + 1) * bs]), extra)"),
                                                        # the parent not verified (a stale child hits)
        ],
    },
}
