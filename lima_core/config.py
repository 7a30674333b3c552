"""Configuration: the model shapes (LLaMA presets) and a run's settings (the LIMA recipe).

A run's settings are four sections, one TOML table each: `[train]` (data, epochs, batch,
dtype, ...), `[optim]` (AdamW and the schedule), `[parallel]` (checkpointing, FSDP dtypes) and
`[sampling]` (LIMA's nucleus sampling, used by dev generations, `lima_core.chat` and every
export's generation_config.json). Every field is also a flag (`--batch-size 32`). Precedence is
defaults < TOML file < flags. An unknown key is an error, never a silent default; a bad value
names where it came from (`file.toml:LINE` or `--flag`). pydantic validates; nothing here does I/O
but reading the TOML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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

ASSETS = Path(__file__).parent / "assets"

# ---- the run: one section a table of the TOML file ----------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The dtype names a run's settings use, and the torch dtypes they mean."""
DType = Literal["fp32", "bf16"]
CHECKPOINTING = ("none", "block", "selective")
"""Activation checkpointing policies (lima_core.checkpointing says what each keeps)."""


class _Section(BaseModel):
    # Unknown keys are errors; so are values of another type (no "1e-3" string for a float, no
    # 1.5 for an int) and NaN or infinite floats. The docstring under each field is its
    # description (--help).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, strict=True,
                              allow_inf_nan=False)


class TrainConfig(_Section):
    """One fine-tuning run. Defaults are the LIMA recipe (Zhou et al. 2023, section 2.3)."""

    name: str = "lima"
    """Run name; outputs go to <out_dir>/<name>/ (a folder name, not a path)."""
    out_dir: str = "runs"
    """Folder that holds the runs."""
    model: str = "tiny"
    """A preset name (random initialisation) or a folder with an HF checkpoint."""
    tokenizer: str = ""
    """tokenizer.model or tokenizer.json; empty means the checkpoint's own, or the bundled one for presets."""
    data: str = "auto"
    """Training conversations, LIMA JSONL; auto: the bundled sample for a preset (a checkpoint needs its data named)."""
    dev_data: str = "auto"
    """Dev conversations (LIMA used 50): dev loss and generations each epoch; auto: the bundled sample for a preset, none for a checkpoint; empty: none."""
    epochs: int = Field(15, ge=1)
    """Passes over the training data."""
    batch_size: int = Field(0, ge=0)
    """Examples per optimizer step; 0 means LIMA's choice: 32 for models of 30B and more, else 64."""
    max_len: int = Field(2048, ge=2)
    """Longest example in tokens; longer ones are truncated. Also the length of a packed row."""
    dropout: float = -1.0
    """Residual dropout at the top layer (linear from 0 at the bottom); -1 means LIMA's: 0.3 above 50B, else 0.2."""
    dtype: DType = "fp32"
    """Compute dtype (autocast): fp32 or bf16. Master weights and optimizer state stay fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    seed: int = Field(1234, ge=0, lt=2**63)
    """Seed of initialisation, data order and dropout masks."""
    select_epochs: tuple[int, int] = Field((5, 10), strict=False)  # TOML has lists, not tuples
    """Epoch window (of 15) the exported checkpoint is chosen from; scaled to the number of epochs."""
    export_epochs: Literal["window", "all"] = "window"
    """Epochs written as HF exports: window (those of the selection window, and the last) or all."""
    judge_url: str = ""
    """An OpenAI-compatible judge (base URL): at the end, choose among the window's epochs by its pairwise verdicts."""
    judge_model: str = ""
    """The judge's model name (with judge_url; the key comes from $OPENAI_API_KEY)."""
    export_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Dtype of the exports: auto keeps the initial checkpoint's (a preset's: dtype), or fp32 or bf16."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Fused ops: triton (lima_kernels), torch (plain-torch references) or auto (triton on CUDA)."""
    save_every: int = Field(0, ge=0)
    """Save the sharded train state every this many steps; 0 means at the end of each epoch."""
    resume: str = ""
    """Resume from a train state: empty (start fresh), auto (the newest complete one of this run) or a path."""
    overwrite: bool = False
    """Start fresh in a run folder that holds an earlier run's states or exports, deleting them."""
    force_resume: bool = False
    """Resume even where the state was saved with other data, tokenizer, model, batch, length, epochs or seed."""
    plot: bool = True
    """Write loss.png."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <out_dir>/<name>/tensorboard/."""

    @field_validator("dropout")
    @classmethod
    def _dropout_rate(cls, p: float) -> float:
        if not (p == -1.0 or 0.0 <= p < 1.0):
            raise ValueError("must be in [0, 1), or -1 for LIMA's choice")
        return p

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError("must be a folder name (not empty, no path separators, not . or ..)")
        return name

    @field_validator("select_epochs")
    @classmethod
    def _window(cls, window: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= window[0] <= window[1]:
            raise ValueError("must be [first, last] with 1 <= first <= last")
        return window

    def data_files(self, from_checkpoint: bool) -> tuple[str, str]:
        """(training data, dev data or ""), `auto` resolved: the bundled samples serve presets
        only; a real checkpoint must name its training data and gets no toy dev set."""
        if from_checkpoint and self.data == "auto":
            raise ConfigError(f"--model {self.model} is a checkpoint: name its training data with --data FILE.jsonl")
        data = str(ASSETS / "train.jsonl") if self.data == "auto" else self.data
        dev = ("" if from_checkpoint else str(ASSETS / "dev.jsonl")) if self.dev_data == "auto" else self.dev_data
        return data, dev

    def residual_dropout(self, n_params: int) -> float:
        """The top layer's dropout rate: as set, or LIMA's (0.3 for 65B, 0.2 for smaller models)."""
        return self.dropout if self.dropout >= 0 else (0.3 if n_params > 50e9 else 0.2)

    def global_batch(self, n_params: int) -> int:
        """Examples per step: as set, or LIMA's (32 from 30B on, 64 below)."""
        return self.batch_size or (32 if n_params >= 30e9 else 64)


class OptimConfig(_Section):
    """AdamW and LIMA's schedule: linear decay from lr to lr_end, no warmup."""

    lr: float = Field(1e-5, ge=0)
    """Learning rate at the first step."""
    lr_end: float = Field(1e-6, ge=0)
    """Learning rate at the last step, reached linearly, no warmup."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW beta2."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW decoupled weight decay (matrices only, not norm weights)."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this; 0 disables."""
    fused_adamw: bool = True
    """Use the native fused AdamW (csrc/) when it is built; torch.optim.AdamW otherwise."""
    moment_dtype: DType = "fp32"
    """AdamW moments: fp32, or bf16 stored with stochastic rounding (half the optimizer memory; native op only)."""


class ParallelConfig(_Section):
    """How the model is spread over ranks and what is kept for backward."""

    checkpointing: Literal[CHECKPOINTING] = "block"
    """Activation checkpointing of the blocks: none, block (recompute each block) or selective (keep matmul outputs)."""
    param_dtype: DType | None = None
    """Dtype FSDP gathers parameters in for compute; unset means train.dtype. Master shards are always fp32."""
    reduce_dtype: DType = "fp32"
    """Dtype gradients are reduce-scattered in; shard gradients accumulate in fp32."""


class SamplingConfig(_Section):
    """LIMA's sampling (section 2.3): dev generations, `lima_core.chat` and the exports' generation_config.json."""

    max_new_tokens: int = Field(2048, ge=1)
    """Longest generated answer in tokens."""
    temperature: float = Field(0.7, ge=0)
    """Softmax temperature; 0 is greedy decoding."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = Field(1.2, gt=0)
    """CTRL's penalty on tokens already in the context (1 disables it)."""


class Config(_Section):
    """A run's whole configuration: `[train]`, `[optim]`, `[parallel]` and `[sampling]` tables."""

    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    parallel: ParallelConfig = ParallelConfig()
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.optim.moment_dtype == "bf16" and not self.optim.fused_adamw:
            raise ValueError("--moment-dtype bf16 needs the native AdamW: it cannot go with --fused-adamw false")
        if bool(self.train.judge_url) != bool(self.train.judge_model):
            raise ValueError("--judge-url and --judge-model go together: give both, or neither")
        if self.train.resume and self.train.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: resume a run or start it afresh")
        return self

    @property
    def param_dtype(self) -> torch.dtype:
        return DTYPES[self.parallel.param_dtype or self.train.dtype]


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


# ---- loading: defaults < TOML < flags, every error naming where the value came from --------

_SECTIONS = {name: field.annotation for name, field in Config.model_fields.items()}


def load_config(argv: list[str] | None = None) -> Config:
    """Config from defaults < `--config FILE.toml` < `--key value` flags (every field is a flag)."""
    parser = argparse.ArgumentParser(prog="python -m lima_core.train", description=Config.__doc__)
    parser.add_argument("--config", help="TOML file with [train], [optim], [parallel] and [sampling] tables")
    add_flags(parser)
    return config_from_args(parser.parse_args(argv))


def add_flags(parser: argparse.ArgumentParser, sections=tuple(_SECTIONS)) -> None:
    """A `--key-name VALUE` flag for every field of `sections` (help: the field's docstring)."""
    for section in sections:
        for key, field in _SECTIONS[section].model_fields.items():
            parser.add_argument(f"--{key.replace('_', '-')}", dest=f"{section}.{key}", default=None, metavar="VALUE",
                                help=f"[{section}] {field.description} (default: {field.default})")


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from the `--config` file (when the parser has one) and the flags `add_flags` made."""
    values: dict[str, dict] = {section: {} for section in _SECTIONS}
    sources: dict[tuple[str, str], str] = {}
    if getattr(args, "config", None):
        _read_toml(Path(args.config), values, sources)
    for dest, text in vars(args).items():
        section, _, key = dest.partition(".")
        if key and text is not None:
            values[section][key] = _flag_value(text, _SECTIONS[section].model_fields[key].annotation)
            sources[section, key] = f"--{key.replace('_', '-')}"
    try:
        return Config(**values)
    except ValidationError as e:
        raise ConfigError(_explain(e, sources)) from None


def _read_toml(path: Path, values: dict[str, dict], sources: dict[tuple[str, str], str]):
    try:
        text = path.read_text()
        tables = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    for section, table in tables.items():
        if section not in _SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}:{_line_of(text, section, None)}: unknown table [{section}]; "
                              f"known: {', '.join(f'[{s}]' for s in _SECTIONS)}")
        values[section].update(table)
        for key in table:
            sources[section, key] = f"{path}:{_line_of(text, section, key)}"


def _line_of(text: str, section: str, key: str | None) -> int:
    """The line of `key = ...` in `[section]`, else of `[section]` itself (1 if neither is found)."""
    current, found = None, 1
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[] ")
            if current == section:
                found = number
                if key is None:
                    return number
        elif current == section and stripped.split("=", 1)[0].strip() == key:
            return number
    return found


def _flag_value(text: str, annotation):
    """A flag's text as TOML when the field is not a string (lists, numbers); pydantic validates."""
    if annotation is str:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # e.g. `true`/`yes` for a bool, or a bad value pydantic will name


def _explain(error: ValidationError, sources: dict[tuple[str, str], str]) -> str:
    """One line an error: where the value came from (file:line or flag), the key and what is wrong."""
    lines = []
    for e in error.errors():
        if not e["loc"]:  # a rule across fields (Config._consistent): its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
            continue
        section, key = (e["loc"] + (None, None))[:2]
        where = sources.get((section, key), "default")
        if e["type"] == "extra_forbidden":
            known = ", ".join(_SECTIONS[section].model_fields) if section in _SECTIONS else ""
            lines.append(f"{where}: unknown key {key!r} in [{section}]; known: {known}")
        else:
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {section}.{key} = {e.get('input')!r}: {message}")
    return "; ".join(lines)
