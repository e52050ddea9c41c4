"""The tokenizer and chat template of the course model, read from its GGUF file."""
import pytest
import torch

TEXTS = ["The capital of France is Paris.", "def f(x):\n    return x * 2\n", "naïve café, 東京, 🙂",
         "  leading spaces and\ttabs  "]


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model[1]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < 49152 for i in ids)
    assert tok.decode(ids) == text


def test_vocabulary_and_special_tokens(tok, real_model):
    model = real_model[0]
    assert len(tok) == model.config.vocab_size == 49152
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2 == model.config.eos_token_id
    # special tokens are single tokens, never split
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 1


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a KV cache?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == tok.encode(text, add_special_tokens=False)


def test_chat_prompt_makes_the_model_answer_as_assistant(real_model, tok):
    """One forward pass of the real model: the templated prompt is what the model was trained on,
    so its first reply token to a greeting is a greeting (a broken template gives something else)."""
    model = real_model[0]
    text = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        first = int(model(ids, last_only=True)[0, -1].argmax())
    assert tok.decode([first]).strip().lower() == "hello"
