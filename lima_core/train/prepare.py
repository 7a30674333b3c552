"""A training run as data: the configuration, the ranks, the model, the tokenizer and the
encoded conversations, all read and validated before anything is written (`prepare`).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lima_core.checkpoint.hf import check_checkpoint, checkpoint_dtype, read_config
from lima_core.checkpoint.run_folder import fingerprint
from lima_core.config import Config, ConfigError
from lima_core.data.encode import Example, check_targets, encode_conversation
from lima_core.data.formats import Conversation, read_conversations
from lima_core.data.tokenizer import BUNDLED_TOKENIZER, Tokenizer
from lima_core.model.llama import Llama
from lima_core.model.shapes import PRESETS, ModelConfig
from lima_core.parallel.distributed import Distributed


@dataclass(frozen=True)
class Run:
    """Everything a run needs, built and validated before the first write."""

    cfg: Config
    dist: Distributed
    model: Llama
    tokenizer: Tokenizer
    train: list[Example]
    dev: list[Conversation]
    dev_examples: list[Example]
    batch_size: int
    out: Path
    init_from: Path | None
    """HF checkpoint the (meta-device) model is filled from once sharded; None: a preset, drawn
    from the seed once sharded."""
    export_dtype: torch.dtype
    """Dtype of the epoch exports (train.export_dtype, resolved)."""
    fingerprint: dict
    """What a saved position depends on (run_folder.fingerprint), recorded in every train state."""

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    def say(self, message: str):
        """A line on stderr from rank 0."""
        if self.dist.rank == 0:
            print(f"lima-core: {message}", file=sys.stderr)


def prepare(cfg: Config, dist: Distributed) -> Run:
    """Read the data, the tokenizer and the model; raises DataError/ConfigError on bad input."""
    t = cfg.train
    checkpoint = Path(t.model) if Path(t.model).is_dir() else None
    if checkpoint is None and t.model not in PRESETS:
        raise ConfigError(f"--model {t.model!r} is neither a checkpoint folder nor a preset name")
    tokenizer = Tokenizer(t.tokenizer or checkpoint or BUNDLED_TOKENIZER)
    data, dev_data = t.data_files(from_checkpoint=checkpoint is not None)
    train, dev = read_conversations(data), read_conversations(dev_data) if dev_data else []
    model = build_model(cfg, checkpoint, tokenizer)
    if t.max_len > model.cfg.max_seq_len:
        raise ConfigError(f"--max-len {t.max_len} is beyond the model's context ({model.cfg.max_seq_len} positions)")
    n_params = model.cfg.num_params()
    model.set_residual_dropout(t.residual_dropout(n_params))
    train_examples = [encode_conversation(tokenizer, c, t.max_len) for c in train]
    dev_examples = [encode_conversation(tokenizer, c, t.max_len) for c in dev]
    for conversations, examples in ((train, train_examples), (dev, dev_examples)):
        warning = check_targets(conversations, examples, t.max_len)  # DataError when none keeps a target
        if warning and dist.rank == 0:
            print(f"warning: {warning}", file=sys.stderr)
    batch_size = t.global_batch(n_params)
    stamp = fingerprint(data, dev_data, tokenizer.path, t.model, batch_size, t.max_len, t.epochs, t.seed)
    return Run(cfg, dist, model, tokenizer, train_examples, dev, dev_examples, batch_size,
               Path(t.out_dir) / t.name, checkpoint, export_dtype(cfg, checkpoint), stamp)


def check_environment(cfg: Config):
    """What the run asks of this machine, before any process group starts: CUDA when --device
    cuda, and for --kernels triton a GPU (or Triton's CPU interpreter, TRITON_INTERPRET=1)."""
    t = cfg.train
    cuda = torch.cuda.is_available()
    if t.device == "cuda" and not cuda:
        raise ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu (or auto)")
    on_cpu = t.device == "cpu" or not cuda
    if t.kernels == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("--kernels triton needs a GPU (or TRITON_INTERPRET=1, Triton's slow CPU interpreter); "
                          "this run is on the CPU: use --kernels auto or torch")
    out = Path(t.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file, not a folder")


def build_model(cfg: Config, checkpoint: Path | None, tokenizer: Tokenizer) -> Llama:
    """The model on the meta device, without values: once sharded, each rank reads its own
    slices of the checkpoint (hf.load_sharded) or draws its own part of a preset's random
    initialisation (init.init_sharded)."""
    torch.manual_seed(cfg.train.seed)
    if checkpoint is not None:
        with torch.device("meta"):
            model = Llama(read_config(checkpoint), kernels=cfg.train.kernels)
        model.resize_vocab(tokenizer.vocab_size)
        check_checkpoint(checkpoint, model)  # every header, before anything is written
        return model
    mcfg = ModelConfig.from_name(cfg.train.model, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                 eos_id=tokenizer.eos_id)
    with torch.device("meta"):
        return Llama(mcfg, kernels=cfg.train.kernels)


def export_dtype(cfg: Config, checkpoint: Path | None) -> torch.dtype:
    """As set, or auto: the initial checkpoint's dtype (a bf16 checkpoint exports bf16), and for
    a preset the compute dtype."""
    if cfg.export_dtype is not None:
        return cfg.export_dtype
    return checkpoint_dtype(checkpoint) if checkpoint is not None else cfg.compute_dtype
