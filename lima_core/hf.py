"""Hugging Face format: config.json + safetensors (one file or sharded with an index).

The model keeps HF's rotate-half q/k layout, so import and export are renaming only (no
permutation). Every export is written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lima_core.config import ConfigError, ModelConfig, RopeScaling, SamplingConfig
from lima_core.io import atomic_dir, commit_dir, temp_path, write_json
from lima_core.model import Llama

# Our parameter names -> HF's, per block ({} is the layer index).
_BLOCK_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_TO_OURS = {v: k for k, v in _TOP_KEYS.items()} | {f"model.layers.{{}}.{v}": f"layers.{{}}.{k}" for k, v in _BLOCK_KEYS.items()}
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")


def hf_key(key: str) -> str:
    """Our state-dict key -> the HF key."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    m = _LAYER.match(key)
    return f"model.layers.{m.group(1)}.{_BLOCK_KEYS[key[m.end():]]}"


def our_key(key: str) -> str | None:
    """HF key -> ours; None for keys the model does not use (e.g. rotary buffers)."""
    m = _LAYER.match(key)
    template = _LAYER.sub("model.layers.{}.", key, count=1) if m else key
    ours = _TO_OURS.get(template)
    return ours.format(m.group(1)) if ours and m else ours


def config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF LlamaConfig dict (transformers 4 or 5 spelling)."""
    if d.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where}: model_type {d.get('model_type')!r} is not llama")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                              high_freq_factor=rope["high_freq_factor"],
                              original_max_position_embeddings=rope["original_max_position_embeddings"])
    elif rope_type == "default":
        scaling = None
    else:
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (default and llama3 are)")
    if d.get("attention_bias") or d.get("mlp_bias") or d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: biases and activations other than silu are not supported")
    eos = d.get("eos_token_id", 2)
    return ModelConfig(
        dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"), ffn_dim=d["intermediate_size"],
        vocab_size=d["vocab_size"], norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=d.get("max_position_embeddings", 2048), tie_embeddings=d.get("tie_word_embeddings", False),
        init_std=d.get("initializer_range", 0.02), bos_id=d.get("bos_token_id", 1),
        eos_id=eos[0] if isinstance(eos, list) else eos)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "dtype": str(dtype).removeprefix("torch."),  # HF spells torch.bfloat16 "bfloat16"
    }


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return files


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    """A Llama from an HF checkpoint folder, built on the meta device then filled from safetensors."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected an HF-format checkpoint folder)")
    cfg = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    with torch.device("meta"):
        model = Llama(cfg)
    wanted = set(model.state_dict())
    state = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                ours = our_key(key)
                if ours in wanted:
                    state[ours] = f.get_tensor(key).to(dtype)
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {hf_key(missing[0])}")
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()
    return model


def save_pretrained(model: Llama, path: str | Path, tokenizer=None, *, dtype: torch.dtype | None = None,
                    sampling: SamplingConfig = SamplingConfig(), max_shard_bytes: int = 5 * 2**30):
    """Write an HF checkpoint folder atomically: config, generation config, safetensors, tokenizer."""
    path = Path(path)
    dtype = dtype or model.tok_embeddings.weight.dtype
    with atomic_dir(path) as tmp:
        tensors = {hf_key(k): v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
        _write_shards(tensors, tmp, max_shard_bytes)
        _write_configs(tmp, model.cfg, dtype, tokenizer, sampling)


def _write_configs(directory: Path, cfg: ModelConfig, dtype: torch.dtype, tokenizer, sampling: SamplingConfig):
    """config.json, generation_config.json and the tokenizer files of an export."""
    write_json(directory / "config.json", config_to_hf(cfg, dtype))
    write_json(directory / "generation_config.json", generation_config(cfg, tokenizer, sampling))
    if tokenizer is not None:
        tokenizer.save(directory)


def generation_config(cfg: ModelConfig, tokenizer=None, sampling: SamplingConfig = SamplingConfig()) -> dict:
    """The run's sampling settings (LIMA's by default); generation stops on EOS and on EOT."""
    eos = [cfg.eos_id] if tokenizer is None else [tokenizer.eos_id, tokenizer.eot_id]
    return {"bos_token_id": cfg.bos_id, "eos_token_id": eos, "do_sample": sampling.temperature > 0,
            "top_p": sampling.top_p, "temperature": sampling.temperature,
            "repetition_penalty": sampling.repetition_penalty, "max_new_tokens": sampling.max_new_tokens}


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int):
    shards, size = [[]], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# ---- sharded models (lima_core.fsdp): streaming export, sliced import -----------------------


def save_sharded(sharded, cfg: ModelConfig, path: str | Path, tokenizer=None, *, dtype: torch.dtype = torch.float32,
                 sampling: SamplingConfig = SamplingConfig(), max_shard_bytes: int = 5 * 2**30):
    """Export a sharded model in HF format in `dtype`; a collective (every rank calls it).

    Units are gathered one at a time, already cast to `dtype`, and the safetensors files are
    written by the ranks in turn (file i by rank i mod world), so no rank holds more than one
    file's worth of tensors and the writing is spread over the ranks. Like the train state,
    this needs the run folder on a filesystem every rank sees. The folder appears atomically.
    """
    path = Path(path)
    files = _plan_files(sharded.units, torch.finfo(dtype).bits // 8, max_shard_bytes)
    names = [_file_name(i, len(files)) for i in range(len(files))]
    tmp = temp_path(path)
    if sharded.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(sharded)
    weight_map, total = {}, 0
    for i, units in enumerate(files):
        tensors = {}
        for unit in units:  # a collective: every rank gathers every unit
            tensors.update({hf_key(k): v.cpu() for k, v in sharded.full_tensors(unit, dtype).items()})
        weight_map.update(dict.fromkeys(tensors, names[i]))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        if i % sharded.world == sharded.rank:
            save_file(tensors, tmp / names[i], metadata={"format": "pt"})
    _barrier(sharded)
    if sharded.rank == 0:
        if len(files) > 1:
            write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_configs(tmp, cfg, dtype, tokenizer, sampling)
        commit_dir(tmp, path)
    _barrier(sharded)  # the export exists for every rank once this returns


def _file_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _barrier(sharded):
    if sharded.world > 1:
        torch.distributed.barrier(group=sharded.group)


def _plan_files(units, element_size: int, max_shard_bytes: int) -> list[list]:
    """Units grouped into files of at most max_shard_bytes (a unit larger than that gets its own)."""
    files, size = [[]], 0
    for unit in units:
        nbytes = unit.numel * element_size
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(unit)
        size += nbytes
    return files


_STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint is stored in: its config.json's `dtype` (transformers 5) or
    `torch_dtype` (4), else its first stored tensor's."""
    path = Path(path)
    d = json.loads((path / "config.json").read_text())
    name = d.get("dtype") or d.get("torch_dtype")
    if name is None:
        with safe_open(str(_safetensors_files(path)[0]), framework="pt", device="cpu") as f:
            first = next(iter(f.keys()), None)
            name = None if first is None else f.get_slice(first).get_dtype()
    if name not in _STORED_DTYPES:
        raise ConfigError(f"{path / 'config.json'}: weights stored as {name!r}; float32, bfloat16 and float16 are supported")
    return _STORED_DTYPES[name]


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an HF checkpoint folder."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected an HF-format checkpoint folder)")
    return config_from_hf(json.loads(config_path.read_text()), str(config_path))


@torch.no_grad()
def load_sharded(sharded, path: str | Path):
    """Fill a sharded model (built on the meta device) from an HF checkpoint, each rank reading
    only the rows its shards cover (safe_open + get_slice). Rows beyond the checkpoint's
    vocabulary (a grown vocabulary) get the mean of the checkpoint's rows, read in chunks."""
    path = Path(path)
    where = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            where.update(dict.fromkeys(f.keys(), file))
    handles = {}
    try:
        for unit in sharded.units:
            for slot in unit.slots:
                key = hf_key(slot.name)
                if key not in where:
                    raise ValueError(f"{path}: checkpoint lacks {key}")
                if where[key] not in handles:
                    handles[where[key]] = safe_open(str(where[key]), framework="pt", device="cpu")
                _load_slot(unit, slot, handles[where[key]].get_slice(key))
    finally:
        handles.clear()


def _load_slot(unit, slot, tensor_slice):
    """Copy the part of one parameter that falls in this rank's shard."""
    lo, hi = unit.local_range
    a, b = max(lo - slot.offset, 0), min(hi - slot.offset, slot.numel)  # element range in the tensor
    if b <= a:
        return
    row = math.prod(slot.shape[1:])
    stored_rows = tensor_slice.get_shape()[0]
    r0, r1 = a // row, -(-b // row)
    pieces = []
    if r0 < stored_rows:
        pieces.append(tensor_slice[r0:min(r1, stored_rows)].to(torch.float32).reshape(-1))
    if r1 > stored_rows:
        mean = _mean_rows(tensor_slice, stored_rows)
        pieces.append(mean.expand(r1 - max(r0, stored_rows), -1).reshape(-1))
    values = torch.cat(pieces)[a - r0 * row:b - r0 * row]
    unit.write_range(slot.offset + a, values)


def _mean_rows(tensor_slice, rows: int, chunk: int = 4096) -> torch.Tensor:
    total = sum(tensor_slice[i:min(i + chunk, rows)].double().sum(0) for i in range(0, rows, chunk))
    return (total / rows).to(torch.float32).unsqueeze(0)
