"""The paged inference engine: sequences, block manager, scheduler, model runner, the LLM API."""
