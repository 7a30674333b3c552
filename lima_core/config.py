"""Configuration: the model shapes (LLaMA presets) and the LIMA training recipe.

Precedence is defaults < TOML file < command line. An unknown key is an error, never a
silent default. `__post_init__` validates and does no I/O.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


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
    kernels: str = "auto"
    """Fused ops: triton (lima_kernels), torch (plain-torch references) or auto (triton on CUDA)."""

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"model: dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.kernels not in ("auto", "triton", "torch"):
            raise ConfigError(f"model: kernels must be auto, triton or torch, got {self.kernels!r}")
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

ASSETS = Path(__file__).parent / "assets"


@dataclass
class TrainConfig:
    """One fine-tuning run. Defaults are the LIMA recipe (Zhou et al. 2023, section 2.3)."""

    name: str = "lima"
    """Run name; outputs go to <out_dir>/<name>/."""
    out_dir: str = "runs"
    """Folder that holds the runs."""
    model: str = "tiny"
    """A preset name (random initialisation) or a folder with an HF checkpoint."""
    tokenizer: str = ""
    """tokenizer.model or tokenizer.json; empty means the checkpoint's own, or the bundled one for presets."""
    data: str = str(ASSETS / "train.jsonl")
    """Training conversations, LIMA JSONL."""
    dev_data: str = str(ASSETS / "dev.jsonl")
    """Dev conversations (LIMA used 50): dev loss and generations each epoch. Empty to skip."""
    epochs: int = 15
    """Passes over the training data."""
    batch_size: int = 0
    """Examples per optimizer step; 0 means LIMA's choice: 32 for models of 30B and more, else 64."""
    max_len: int = 2048
    """Longest example in tokens; longer ones are truncated. Also the length of a packed row."""
    lr: float = 1e-5
    """Learning rate at the first step."""
    lr_end: float = 1e-6
    """Learning rate at the last step, reached linearly, no warmup."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    dropout: float = -1.0
    """Residual dropout at the top layer (linear from 0 at the bottom); -1 means LIMA's: 0.3 above 50B, else 0.2."""
    dtype: str = "fp32"
    """Parameter and compute dtype: fp32 or bf16."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    seed: int = 1234
    """Seed of initialisation, data order and dropout masks."""
    gen_max_tokens: int = 2048
    """Longest generated dev answer (LIMA: 2048)."""
    top_p: float = 0.9
    """Nucleus sampling mass for dev generations."""
    temperature: float = 0.7
    """Sampling temperature for dev generations."""
    repetition_penalty: float = 1.2
    """Repetition penalty for dev generations."""
    select_epochs: tuple[int, int] = (5, 10)
    """Epoch window (of 15) the exported checkpoint is chosen from; scaled to the number of epochs."""
    plot: bool = True
    """Write loss.png."""
    kernels: str = "auto"
    """Fused ops: triton (lima_kernels), torch (plain-torch references) or auto (triton on CUDA)."""
    fused_adamw: bool = True
    """Use the native fused AdamW (csrc/) when it is built; torch.optim.AdamW otherwise."""
    moment_dtype: str = "fp32"
    """AdamW moments: fp32, or bf16 stored with stochastic rounding (half the optimizer memory; native op only)."""
    checkpointing: str = "block"
    """Activation checkpointing of the blocks: none, block (recompute each block) or selective (keep matmul outputs)."""
    param_dtype: str = "fp32"
    """Dtype of the gathered compute parameters (fp32 or bf16); master shards are always fp32."""
    reduce_dtype: str = "fp32"
    """Dtype gradients are reduce-scattered in (fp32 or bf16); shard gradients accumulate in fp32."""
    save_every: int = 0
    """Save the sharded train state every this many steps; 0 means at the end of each epoch."""
    resume: str = ""
    """Resume from a train state: empty (start fresh), auto (the newest complete one of this run) or a path."""

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train.dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("epochs", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 0:
            raise ConfigError(f"train.batch_size must be >= 0, got {self.batch_size}")
        if not (self.dropout == -1.0 or 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"train.dropout must be in [0, 1) or -1 (auto), got {self.dropout}")
        if not (0 < self.top_p <= 1 and self.temperature >= 0 and self.repetition_penalty > 0):
            raise ConfigError("train: top_p in (0, 1], temperature >= 0 and repetition_penalty > 0 are required")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ConfigError(f"train.kernels must be auto, triton or torch, got {self.kernels!r}")
        if self.checkpointing not in ("none", "block", "selective"):
            raise ConfigError(f"train.checkpointing must be none, block or selective, got {self.checkpointing!r}")
        for name in ("param_dtype", "reduce_dtype", "moment_dtype"):
            if getattr(self, name) not in ("fp32", "bf16"):
                raise ConfigError(f"train.{name} must be fp32 or bf16, got {getattr(self, name)!r}")
        if self.save_every < 0:
            raise ConfigError(f"train.save_every must be >= 0, got {self.save_every}")
        self.select_epochs = tuple(self.select_epochs)
        if len(self.select_epochs) != 2 or not 1 <= self.select_epochs[0] <= self.select_epochs[1]:
            raise ConfigError(f"train.select_epochs must be [first, last] with 1 <= first <= last, got {self.select_epochs}")


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


def _parse_value(text: str, annotation: str):
    """A command-line string as the field's type (TOML syntax for lists)."""
    if annotation == "str":
        return text
    if annotation == "bool":
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return tomllib.loads(f"v = {text}")["v"]


def load_train_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from defaults < `--config FILE.toml` < `--key value` flags."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    parser = argparse.ArgumentParser(prog="python -m lima_core.train", description=TrainConfig.__doc__)
    parser.add_argument("--config", help="TOML file with a [train] table")
    docs = _field_docs(TrainConfig)
    for name, f in fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar="VALUE",
                            help=f"{docs.get(name, '')} (default: {f.default})")
    args = parser.parse_args(argv)

    values: dict = {}
    if args.config:
        path = Path(args.config)
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        unknown = sorted(set(table) - {"train"})
        if unknown:
            raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}; expected [train]")
        values.update(table.get("train", {}))
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) in [train]: {', '.join(unknown)}")
    for name in fields:
        text = getattr(args, name)
        if text is not None:
            annotation = {str: "str", bool: "bool"}.get(hints[name], "other")
            try:
                values[name] = _parse_value(text, annotation)
            except (ValueError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"--{name.replace('_', '-')}: cannot parse {text!r}: {e}") from None
    return _build(TrainConfig, values, "train config")


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (its one-line description)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: doc.value.value for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}
