"""The shape of a LLaMA-family model (HF `LlamaConfig` in our own names) and the named presets
of the LLaMA-1, -2 and -3 papers. A plain dataclass: shapes are checked in `__post_init__`, with
no I/O; a run's settings (lima_core.config) are a separate, pydantic-validated matter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lima_core.config import ConfigError


@dataclass
class RopeScaling:
    """LLaMA 3.1's "llama3" frequency scaling of rotary embeddings."""

    factor: float = 8.0
    """How much longer the extended context is than the original one."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are not scaled."""
    original_max_position_embeddings: int = 8192
    """The context length the model was pretrained with."""


@dataclass
class ModelConfig:
    """The shape of a LLaMA-family model (HF `LlamaConfig` in our own names)."""

    dim: int = 4096
    """Width of the residual stream (HF hidden_size)."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_heads."""
    head_dim: int | None = None
    """Width of one head; None means dim // n_heads."""
    ffn_dim: int = 11008
    """Hidden width of the SwiGLU MLP (HF intermediate_size)."""
    vocab_size: int = 32000
    """Rows of the embedding and of the output head."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: RopeScaling | None = None
    """LLaMA 3.1 rope scaling; None for plain RoPE."""
    max_seq_len: int = 2048
    """Longest sequence the model was built for (HF max_position_embeddings)."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    bos_id: int = 1
    """Beginning-of-sequence token id, recorded in the HF export."""
    eos_id: int = 2
    """End-of-sequence token id, recorded in the HF export."""

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"model: dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _build(RopeScaling, self.rope_scaling, "model.rope_scaling")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model: head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A preset by name (see PRESETS), with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self) -> int:
        """Parameter count, embeddings and head included (the head once when tied)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * block + self.vocab_size * self.dim + head + self.dim


_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192, bos_id=128000, eos_id=128001)
_LLAMA31 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                                original_max_position_embeddings=8192))

# Shapes from the LLaMA-1, LLaMA-2 and LLaMA-3 papers and their released configs.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512, vocab_size=1024,
                 norm_eps=1e-5, max_seq_len=2048),
    "llama-7b": dict(_LLAMA1, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
    "llama-13b": dict(_LLAMA1, dim=5120, n_layers=40, n_heads=40, ffn_dim=13824),
    "llama-33b": dict(_LLAMA1, dim=6656, n_layers=60, n_heads=52, ffn_dim=17920),
    "llama-65b": dict(_LLAMA1, dim=8192, n_layers=80, n_heads=64, ffn_dim=22016),
    "llama-2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
    "llama-2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40, ffn_dim=13824),
    "llama-2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama-3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "llama-3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama-3.1-8b": dict(_LLAMA31, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "llama-3.1-70b": dict(_LLAMA31, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
}


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
