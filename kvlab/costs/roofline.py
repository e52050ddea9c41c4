"""The roofline model: is a kernel limited by arithmetic or by memory traffic?

Williams, Waterman and Patterson, 2009, "Roofline: An Insightful Visual Performance Model for
Multicore Architectures": a kernel doing F FLOPs while moving B bytes has arithmetic intensity
I = F / B, and on a machine with peak P FLOP/s and bandwidth W bytes/s it can reach at most
min(P, I x W) FLOP/s. The ridge point P / W separates memory-bound (left) from compute-bound.

For a transformer's weight matmuls, a forward over T tokens reads every weight once (2 bytes in
fp16) and does 2 FLOPs per weight per token, so I ~= T: prefill (T = prompt length, hundreds)
sits right of the ridge, decode (T = batch size, often 1) far left of it.

`measure_peak_flops` and `measure_bandwidth` time this machine with torch (median of repeats);
`GPUS` holds datasheet numbers.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Machine:
    name: str
    peak_flops: float      # FLOP/s (dense, the dtype named in `source`)
    bandwidth: float       # bytes/s of main (HBM or DRAM) memory
    memory_bytes: float = 0.0
    source: str = ""

    @property
    def ridge(self) -> float:
        """FLOPs per byte where the roofline turns from memory-bound to compute-bound."""
        return self.peak_flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        """Roofline bound in FLOP/s for a kernel of `intensity` FLOPs per byte."""
        if intensity <= 0:
            raise ValueError(f"intensity must be positive, got {intensity}")
        return min(self.peak_flops, intensity * self.bandwidth)


GPUS = {
    "H100 SXM": Machine("H100 SXM", peak_flops=989e12, bandwidth=3.35e12, memory_bytes=80e9,
                        source="NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOPS dense BF16 "
                               "(1,979 with sparsity), 3.35 TB/s HBM3, 80 GB"),
    "H200": Machine("H200", peak_flops=989e12, bandwidth=4.8e12, memory_bytes=141e9,
                    source="NVIDIA H200 Tensor Core GPU datasheet: 989 TFLOPS dense BF16 "
                           "(1,979 with sparsity), 4.8 TB/s HBM3e, 141 GB"),
}


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peak_flops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n x n matmul on this CPU (2 n^3 FLOPs), median of `repeats`."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / _median_seconds(lambda: torch.mm(a, b), repeats)


def measure_bandwidth(nbytes: int = 256 * 2 ** 20, repeats: int = 5) -> float:
    """Bytes/s of copying an `nbytes` float32 buffer (counts the read and the write), median."""
    if nbytes < 4:
        raise ValueError(f"nbytes must be >= 4, got {nbytes}")
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), repeats)


def measure_machine(name: str = "this CPU", n: int = 1024, nbytes: int = 256 * 2 ** 20,
                    repeats: int = 5) -> Machine:
    return Machine(name, measure_peak_flops(n, repeats), measure_bandwidth(nbytes, repeats),
                   source=f"measured: float32 {n}^3 matmul and {nbytes / 2**20:.0f} MiB copy, "
                          f"median of {repeats}, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads")


def linear_intensity(tokens: int, in_features: int, out_features: int, dtype_bytes: float = 2) -> float:
    """FLOPs per byte of y = x W for `tokens` rows: 2 T K N FLOPs over (K N + T K + T N) values moved."""
    if min(tokens, in_features, out_features) < 1:
        raise ValueError("tokens, in_features and out_features must be >= 1")
    flops = 2 * tokens * in_features * out_features
    moved = (in_features * out_features + tokens * (in_features + out_features)) * dtype_bytes
    return flops / moved
