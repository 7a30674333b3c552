"""The GPUs of a cluster, the nodes they sit in and the links between them: the levels a
collective runs over (the traffic formulas) and the speed of each link (the times). H100 SXM
figures by default.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    """GPUs in nodes and their links: H100 SXM by default (NVLink 4: 900 GB/s a GPU both ways;
    one 400 Gbit/s NIC a GPU; HBM3 at 3.35 TB/s)."""

    gpus: int
    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0
    """NVLink bandwidth a GPU, each way, GB/s."""
    nic_gbps: float = 400.0
    """Network bandwidth a GPU (its own NIC), Gbit/s."""
    hbm_gbs: float = 3350.0
    nvlink_latency_us: float = 5.0
    """One small all-reduce inside a node (assumed: NCCL's low-latency protocol over NVSwitch)."""

    @property
    def node_size(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    @property
    def nodes(self) -> int:
        return self.gpus // self.node_size

    def size(self, level: str) -> int:
        return {"world": self.gpus, "node": self.node_size, "cross": self.nodes}[level]

    def seconds(self, nvlink_bytes: float = 0.0, nic_bytes: float = 0.0, hbm_bytes: float = 0.0) -> dict[str, float]:
        """Seconds each link needs for its bytes."""
        return {"NVLink": nvlink_bytes / (self.nvlink_gbs * 1e9), "NIC": nic_bytes / (self.nic_gbps * 1e9 / 8),
                "HBM": hbm_bytes / (self.hbm_gbs * 1e9)}
