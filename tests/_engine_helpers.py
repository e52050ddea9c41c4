"""Shared by the block-manager, prefix-cache and radix-cache tests."""
from dataclasses import dataclass, field


@dataclass
class FakeSeq:
    """The smallest object the block managers accept (the real one is kvlab.engine.sequence)."""
    seq_id: int
    token_ids: list
    cache_salt: str | None = None
    block_table: list = field(default_factory=list)
    num_cached_tokens: int = 0

    def __len__(self):
        return len(self.token_ids)
