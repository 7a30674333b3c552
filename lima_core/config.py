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

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""

ASSETS = Path(__file__).parent / "assets"

# ---- the run: one section a table of the TOML file ----------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The dtype names a run's settings use, and the torch dtypes they mean."""
DType = Literal["fp32", "bf16"]
CHECKPOINTING = ("none", "block", "selective")
"""Activation checkpointing policies (lima_core.parallel.checkpointing says what each keeps)."""


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
    """Dev conversations (LIMA used 50): dev loss and generations each epoch; auto: the bundled sample for a
    preset, none for a checkpoint; empty: none."""
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
    node_size: int = Field(0, ge=0)
    """Ranks per node (they share NVLink; nodes talk over NICs); 0 means torchrun's LOCAL_WORLD_SIZE."""
    sharding: Literal["flat", "two-level"] = "flat"
    """flat: every unit gathered over all ranks in forward and backward; two-level: master weights and AdamW
    sharded over all ranks, the working copy kept sharded inside the node between forward and backward."""
    dev_decode: Literal["auto", "node", "gather"] = "auto"
    """Dev generation: node (each node holds one tensor-parallel copy, gathered once an epoch), gather (every
    decode step gathers each unit) or auto (node where the copy fits)."""
    count_bytes: bool = False
    """Count the bytes each collective moves per level and write them to <out_dir>/<name>/bytes.json."""


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

    # The other dtypes resolved, so the trainer hands torch dtypes on and never looks one up.
    @property
    def compute_dtype(self) -> torch.dtype:
        """Autocast's dtype (train.dtype)."""
        return DTYPES[self.train.dtype]

    @property
    def reduce_dtype(self) -> torch.dtype:
        """The dtype gradients are reduce-scattered in (parallel.reduce_dtype)."""
        return DTYPES[self.parallel.reduce_dtype]

    @property
    def moment_dtype(self) -> torch.dtype:
        """AdamW's moments (optim.moment_dtype)."""
        return DTYPES[self.optim.moment_dtype]

    @property
    def export_dtype(self) -> torch.dtype | None:
        """The exports' dtype (train.export_dtype); None for auto, which the initial checkpoint
        decides (lima_core.train.prepare.export_dtype)."""
        return None if self.train.export_dtype == "auto" else DTYPES[self.train.export_dtype]
