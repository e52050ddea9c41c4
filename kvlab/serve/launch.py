"""Start an OpenAI-compatible server as a child process and wait until it answers; read its /metrics.

    with launch(["--max-model-len", "512"]) as server:       # kvlab serve on a free loopback port
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
        read_metrics(server.url)["vllm:num_requests_running"]

The tests, chapter 11 and benchmarks/serve_load.py use it; `cmd` starts another server (vLLM's
`vllm serve`) the same way. Only loopback addresses are used.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: str

    def log(self, last: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-last:]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def launch(args=(), port: int | None = None, cmd: list[str] | None = None, timeout: float = 300,
           env: dict | None = None, log_path: str | None = None) -> ServerProcess:
    """Start `cmd + args + --host 127.0.0.1 --port P` and return once GET /health answers 200."""
    port = free_port() if port is None else port
    cmd = [sys.executable, "-m", "kvlab.serve"] if cmd is None else list(cmd)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="kvlab-serve-", suffix=".log")
        os.close(fd)
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cmd, *map(str, args), "--host", HOST, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, f"http://{HOST}:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"the server did not answer /health within {timeout} s:\n{server.log()}")


def read_metrics(url: str) -> dict[str, float]:
    """GET /metrics as {name or name{label="value",...}: value}; the model_name label is dropped."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k not in ("model_name", "engine"))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
