"""The reference check: kvlab's Llama equals Hugging Face's LlamaForCausalLM on the same GGUF file."""

import pytest
import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a land far away, there lived", "<|im_start|>user\nWhat is a KV cache?"]


@pytest.fixture(scope="module")
def hf_model():
    from kvlab.model.load import load_hf_reference

    return load_hf_reference()


@pytest.mark.slow
def test_logits_match_hugging_face(real_model, hf_model):
    model, tok = real_model
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (hf_model(ids).logits - model(ids)).abs().max().item()
        assert diff <= 1e-3, f"max |logit diff| {diff:.2e} > 1e-3 on {text!r}"


@pytest.mark.slow
def test_32_greedy_tokens_match_hugging_face(real_model, hf_model):
    model, tok = real_model
    for text in PROMPTS[:2]:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=2)[0, ids.shape[1]:]
            x, ours = ids, []
            for _ in range(32):  # recompute the whole prefix: no cache involved in this check
                nxt = int(model(x, last_only=True)[0, -1].argmax())
                ours.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
        assert len(ref) >= 16, "the reference stopped early; pick a longer-running prompt"
        assert ours[: len(ref)] == ref.tolist()
