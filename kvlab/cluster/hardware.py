"""Bandwidths and capacities of the places a KV cache can live or travel through, with sources.

Units: bytes and bytes per second, GB = 10^9 bytes (datasheets count in powers of ten). A link's
bandwidth is **per direction**: moving a KV cache from A to B uses one direction of the link.
These are peak datasheet or specification numbers; a real transfer reaches less (protocol
overhead, small transfers, contention), so every time computed from them is a lower bound.
`efficiency` parameters elsewhere in kvlab.cluster let a model scale them down explicitly.

| name | per direction | source |
|---|---|---|
| `HBM3 (H100 SXM)` | 3.35 TB/s | NVIDIA H100 Tensor Core GPU datasheet (also `kvlab.costs.roofline.GPUS`) |
| `NVLink 4 (H100 SXM)` | 450 GB/s | H100 datasheet: 900 GB/s NVLink, counted over both directions |
| `PCIe 5.0 x16` | 64 GB/s | PCI-SIG PCIe 5.0 spec: 32 GT/s x 16 lanes (63 GB/s after 128b/130b) |
| `InfiniBand NDR (ConnectX-7)` | 50 GB/s | NVIDIA ConnectX-7 datasheet: 400 Gb/s per port |
| `NVMe SSD (PCIe 4.0 x4)` | 7 GB/s read | Samsung PM1733 datasheet: 7,000 MB/s sequential read |

The H100 datasheet lists PCIe Gen5 as 128 GB/s, counted over both directions.
Capacities of one NVIDIA DGX H100 (DGX H100 datasheet): 8 x 80 GB HBM3, 2 TB of system memory,
8 x 3.84 TB NVMe U.2 data drives (30.72 TB).
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class Link:
    """A path KV bytes travel over: `bandwidth` bytes/s in one direction, `latency` s per transfer."""
    name: str
    bandwidth: float
    latency: float = 0.0
    source: str = ""

    def __post_init__(self):
        if not self.bandwidth > 0:
            raise ValueError(f"Link.bandwidth must be > 0 bytes/s, got {self.bandwidth}")
        if not self.latency >= 0:
            raise ValueError(f"Link.latency must be >= 0 s, got {self.latency}")

    def seconds(self, nbytes: float) -> float:
        """Time to move `nbytes` over this link: latency + bytes / bandwidth (0 bytes: 0 s)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return 0.0 if nbytes == 0 else self.latency + nbytes / self.bandwidth


LINKS: dict[str, Link] = {k.name: k for k in [
    Link("HBM3 (H100 SXM)", 3.35 * TB, source="NVIDIA H100 Tensor Core GPU datasheet, SXM: 3.35 TB/s"),
    Link("NVLink 4 (H100 SXM)", 450 * GB,
         source="NVIDIA H100 datasheet, SXM: NVLink 900 GB/s total, i.e. 450 GB/s per direction"),
    Link("PCIe 5.0 x16", 64 * GB,
         source="PCI-SIG PCI Express 5.0 Base Specification: 32 GT/s per lane, x16, 128b/130b "
                "encoding (63 GB/s); NVIDIA H100 datasheet: PCIe Gen5 128 GB/s (both directions)"),
    Link("InfiniBand NDR (ConnectX-7)", 50 * GB,
         source="NVIDIA ConnectX-7 datasheet: 400 Gb/s per port = 50 GB/s"),
    Link("NVMe SSD (PCIe 4.0 x4)", 7 * GB,
         source="Samsung PM1733 datasheet: 7,000 MB/s sequential read (one drive)"),
]}

DGX_H100 = {
    "hbm_bytes_per_gpu": 80 * GB,
    "gpus": 8,
    "dram_bytes": 2 * TB,
    "ssd_bytes": 8 * 3.84 * TB,
    "source": "NVIDIA DGX H100 datasheet: 8x H100 80 GB, 2 TB system memory, "
              "8x 3.84 TB NVMe U.2 internal storage",
}
