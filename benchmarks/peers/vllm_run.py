"""vLLM's CPU backend as a benchmark peer: a process that loads the model once, then serves
workloads read from stdin, one JSON object a line, until stdin closes. Run it with the peer venv's
Python (benchmarks/peers/vllm_cpu_env.sh); benchmarks/engine_cpu.py drives it.

  in:  {"prompts": [[token ids], ...], "max_tokens": [n, ...]}
  out: a line "KVLAB_RESULT {"seconds": s, "token_ids": [[...], ...]}" (vLLM logs to the same
       stream; the prefix marks the answer), after a first "KVLAB_READY {...}" once loaded.

Token ids go in (TokensPrompt), so both engines see the same prompts; greedy, ignore_eos, each
request exactly its max_tokens. Wall time covers llm.generate only.
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-bytes", type=int, default=512 * 2**20)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    args = ap.parse_args()

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              kv_cache_memory_bytes=args.kv_cache_bytes, enforce_eager=args.eager,
              enable_prefix_caching=False, seed=0)
    info = dict(vllm=vllm.__version__, torch=torch.__version__, dtype=args.dtype, eager=args.eager,
                load_seconds=round(time.perf_counter() - t, 1))
    print("KVLAB_READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)
                  for n in job["max_tokens"]]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        ids = [list(o.outputs[0].token_ids) for o in outs]
        print("KVLAB_RESULT " + json.dumps(dict(seconds=seconds, token_ids=ids)), flush=True)


if __name__ == "__main__":   # vLLM spawns its workers: the main guard is required
    main()
