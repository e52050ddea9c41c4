"""The tokenizer and chat template, through `transformers`, read from the GGUF file or HF folder.

Converting a GGUF vocabulary to a fast tokenizer takes seconds; the result is saved next to the
cached weights (see kvlab.model.load) and read back from there.
"""
from __future__ import annotations

import functools
import os
import warnings


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, use_cache: bool = True):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from kvlab.model.load import cache_dir_for

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if os.path.isdir(path):
            return AutoTokenizer.from_pretrained(path)
        saved = os.path.join(cache_dir_for(path), "tokenizer")
        if use_cache and os.path.isfile(os.path.join(saved, "tokenizer.json")):
            return AutoTokenizer.from_pretrained(saved)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        if use_cache:
            try:
                tok.save_pretrained(saved)
            except OSError:
                pass
        return tok
