"""Hugging Face format: config.json + safetensors (one file or sharded with an index).

The model keeps HF's rotate-half q/k layout, so import and export are renaming only (no
permutation). Every export is written into a temporary folder and renamed into place; the
files, their names and the index are checkpoint.sharded's, for one process and for many alike.

Loading checks the whole checkpoint before it reads a single tensor (`check_checkpoint`):
config.json's fields, the index, and every safetensors header (present, floating point, the
shape config.json implies). Only the vocabulary may differ, and only in the model: its
embedding and head may have more rows than the checkpoint's (a new token such as EOT). Every
problem is one CheckpointError whose message starts with the file at fault. Weights are read
from safetensors only: no pickle is ever loaded.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lima_core.checkpoint.atomic import atomic_dir, write_json
from lima_core.checkpoint.sharded import (
    INDEX,
    SAFETENSORS_METADATA,
    collective_dir,
    nbytes,
    shard_files,
    write_index,
    write_shards,
)
from lima_core.config import SamplingConfig
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig, RopeScaling
from lima_core.parallel.fsdp import FSDP


class CheckpointError(ValueError):
    """A checkpoint folder lima-core cannot read as it is; the message starts with the file at fault."""


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
_TO_OURS = {v: k for k, v in _TOP_KEYS.items()} | {f"model.layers.{{}}.{v}": f"layers.{{}}.{k}"
                                                   for k, v in _BLOCK_KEYS.items()}
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


_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF LlamaConfig dict (transformers 4 or 5 spelling); a CheckpointError
    naming `where` for a field that is missing, of the wrong type or out of range."""
    if d.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: model_type {d.get('model_type')!r} is not llama")
    _check_sizes(d, where)
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.get("rope_theta", _get(d, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        for name in _LLAMA3_ROPE:
            _check_positive_number(rope.get(name), f"rope {name}", where)
        scaling = RopeScaling(**{name: rope[name] for name in _LLAMA3_ROPE})
    elif rope_type == "default":
        scaling = None
    else:
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (default and llama3 are)")
    if d.get("attention_bias") or d.get("mlp_bias") or d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: biases and activations other than silu are not supported")
    _check_positive_number(theta, "rope_theta", where)
    _check_positive_number(_get(d, "rms_norm_eps", 1e-6), "rms_norm_eps", where)
    eos = _get(d, "eos_token_id", 2)
    try:
        return ModelConfig(
            dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"), ffn_dim=d["intermediate_size"],
            vocab_size=d["vocab_size"], norm_eps=_get(d, "rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=scaling, max_seq_len=_get(d, "max_position_embeddings", 2048),
            tie_embeddings=_get(d, "tie_word_embeddings", False), init_std=_get(d, "initializer_range", 0.02),
            bos_id=_get(d, "bos_token_id", 1), eos_id=eos[0] if isinstance(eos, list) else eos)
    except (ValueError, TypeError) as e:  # what the checks above leave to ModelConfig (an odd head_dim)
        raise CheckpointError(f"{where}: {str(e).removeprefix('model: ')}") from None


def _get(d: dict, name: str, default):
    """d[name], or the default when it is absent or null (as transformers reads it)."""
    value = d.get(name)
    return default if value is None else value


def _check_sizes(d: dict, where: str):
    """The sizes a Llama is built from: present, positive integers, and heads that fit the width."""
    for name in _SIZES:
        if name not in d:
            raise CheckpointError(f"{where}: no {name} (a Llama config.json needs {', '.join(_SIZES)})")
    for name in _SIZES + _OPTIONAL_SIZES:
        value = d.get(name)
        if (name in _SIZES or value is not None) and not _is_positive_int(value):
            raise CheckpointError(f"{where}: {name} is {json.dumps(value)}, not a positive integer")
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    if d.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads}")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_positive_number(value, name: str, where: str):
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise CheckpointError(f"{where}: {name} is {json.dumps(value)}, not a positive number")


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
        **EXPORT_MARK,  # what lets save_pretrained replace this folder later (see _check_replaceable)
    }


# ---- reading a checkpoint: every header checked before any tensor is read ------------------

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")  # the rows a model may add (EOT)


@dataclass(frozen=True)
class Stored:
    """A tensor as its safetensors header describes it."""

    file: Path
    shape: tuple[int, ...]
    dtype: str
    """safetensors' name for it: F32, BF16, F16, I64, BOOL, ..."""


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an HF checkpoint folder."""
    return config_from_hf(_config_json(Path(path)), str(Path(path) / "config.json"))


def _config_json(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF-format checkpoint folder)")
    return _read_json(path / "config.json")


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except ValueError as e:  # a syntax error, or bytes that are not UTF-8
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(value).__name__}, not an object")
    return value


def check_checkpoint(path: str | Path, model: Llama | ModelConfig | None = None) -> ModelConfig:
    """Check an HF checkpoint folder without reading a tensor; returns its ModelConfig.

    config.json must describe a Llama, the index (if any) must name files that exist, and every
    tensor that config implies must be in some safetensors file, floating point and of the shape
    config implies. Given the model it will fill (a Llama not yet sharded, or its config, e.g. one
    whose vocabulary grew by EOT), the model's shapes must be the checkpoint's but for more
    vocabulary rows. The trainer calls it in run.prepare, so a bad checkpoint stops the run
    before anything is written."""
    cfg, stored = _inspect(Path(path))
    if model is not None:
        shapes = _shapes(model) if isinstance(model, ModelConfig) else _model_shapes(model)
        _check_tensors(stored, shapes, "the model has", lacks=Path(path), grown_vocab=True)
    return cfg


def inspect_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, Stored]]:
    """check_checkpoint's config and every tensor's header (its file, shape and dtype), for a
    reader of slices (load_sharded, decode_layout.load_tensor_parallel)."""
    return _inspect(Path(path))


def _inspect(path: Path) -> tuple[ModelConfig, dict[str, Stored]]:
    """The checkpoint's config and its tensors' headers, checked against each other."""
    cfg = read_config(path)
    files, listed = _weight_files(path)
    stored = _read_headers(files)
    expected = _shapes(cfg)
    for key, entry in stored.items():
        unused = key == "lm_head.weight" and cfg.tie_embeddings  # older exports of tied models keep a copy
        if our_key(key) is not None and key not in expected and not unused:
            raise CheckpointError(f"{entry.file}: holds {key}, which has no place in the {cfg.n_layers}-layer "
                                  f"model config.json describes")
    lacks = files[0] if len(files) == 1 else path
    _check_tensors(stored, expected, "the config says", lacks=lacks, listed=listed)
    return cfg, stored


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of every tensor a checkpoint of `cfg` holds (the model built on meta says)."""
    with torch.device("meta"):
        return _model_shapes(Llama(cfg))


def _model_shapes(model: Llama) -> dict[str, tuple[int, ...]]:
    return {hf_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def _weight_files(path: Path) -> tuple[list[Path], dict[str, Path]]:
    """The checkpoint's safetensors files, and the file its index (if any) lists each tensor in."""
    index = path / INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no weight_map of tensor names to file names")
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or not (path / name).is_file():
                raise CheckpointError(f"{index}: lists {name}, which is not a file in {path}")
        listed = {key: path / name for key, name in weight_map.items()}
        return sorted(set(listed.values())), listed
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, {}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: holds only pickled weights ({', '.join(pickles)}); lima-core reads safetensors only and never "
            f"unpickles. Convert it once with transformers: LlamaForCausalLM.from_pretrained(folder)"
            f".save_pretrained(new_folder, safe_serialization=True)")
    raise CheckpointError(f"{path}: no weights (no model.safetensors, no {INDEX})")


def _open(file: Path, device: str | torch.device = "cpu"):
    """safe_open, with what safetensors finds wrong (a truncated file, a header whose offsets or
    shapes do not add up) reported against the file."""
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _read_headers(files: list[Path]) -> dict[str, Stored]:
    stored = {}
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if key in stored:
                    raise CheckpointError(f"{file}: holds {key}, which {stored[key].file.name} holds too")
                part = f.get_slice(key)
                stored[key] = Stored(file, tuple(part.get_shape()), part.get_dtype())
    return stored


def _check_tensors(stored: dict[str, Stored], expected: dict[str, tuple[int, ...]], says: str, *, lacks: Path,
                   listed: dict[str, Path] | None = None, grown_vocab: bool = False):
    """Every expected tensor stored, floating point, of its expected shape; with grown_vocab the
    expected vocabulary rows may outnumber the stored ones (they are filled in on loading)."""
    missing = [key for key in expected if key not in stored]
    if missing:
        more = f" and {len(missing) - 1} more tensor(s)" if len(missing) > 1 else ""
        raise CheckpointError(f"{(listed or {}).get(missing[0], lacks)}: lacks {missing[0]}{more}")
    for key, shape in expected.items():
        entry = stored[key]
        if entry.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{entry.file}: {key} is stored as {entry.dtype}; weights must be floating "
                                  f"point (F32, BF16 or F16)")
        grows = grown_vocab and key in _VOCAB_KEYS and entry.shape[1:] == shape[1:] and entry.shape[0] <= shape[0]
        if entry.shape != shape and not grows:
            raise CheckpointError(f"{entry.file}: {key} has shape {_format(entry.shape)}, {says} {_format(shape)}")


def _format(shape: tuple[int, ...]) -> str:
    return f"({', '.join(map(str, shape))})"


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    """A Llama from an HF checkpoint folder, built on the meta device then filled from safetensors."""
    cfg, stored = _inspect(Path(path))
    with torch.device("meta"):
        model = Llama(cfg)
    by_file = {}
    for key in model.state_dict():
        by_file.setdefault(stored[hf_key(key)].file, []).append(key)
    state = {}
    for file, keys in by_file.items():
        with _open(file, device) as f:
            state.update({key: f.get_tensor(hf_key(key)).to(dtype) for key in keys})
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()
    return model


# ---- writing ----------------------------------------------------------------------------

EXPORT_MARK = {"exported_by": "lima-core"}
"""In every export's config.json (transformers keeps unknown keys): a folder that carries it,
and holds nothing an export does not write, is one save_pretrained may replace."""
_EXPORT_FILES = re.compile(r"config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
                           r"model-\d{5}-of-\d{5}\.safetensors|tokenizer\.model|tokenizer\.json|tokenizer_config\.json")


def save_pretrained(model: Llama, path: str | Path, tokenizer=None, *, dtype: torch.dtype | None = None,
                    sampling: SamplingConfig = SamplingConfig(), max_shard_bytes: int = 5 * 2**30):
    """Write an HF checkpoint folder atomically: config, generation config, safetensors, tokenizer.

    The folder is replaced whole, so it must be new, empty, or an earlier lima-core export:
    anything else is refused (FileExistsError) rather than deleted."""
    path = Path(path)
    _check_replaceable(path)
    dtype = dtype or model.tok_embeddings.weight.dtype
    with atomic_dir(path) as tmp:
        tensors = {hf_key(k): v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
        write_shards(tensors, tmp, max_shard_bytes)
        _write_configs(tmp, model.cfg, dtype, tokenizer, sampling)


def _check_replaceable(path: Path):
    """Refuse a folder save_pretrained did not write all of: replacing it would lose the rest."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a folder; save_pretrained writes a folder")
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return
    foreign = [name for name in names if not _EXPORT_FILES.fullmatch(name)]
    if foreign:
        raise FileExistsError(f"{path}: holds {foreign[0]}, which no lima-core export contains; save_pretrained "
                              f"replaces the whole folder, so it writes only into a new, empty or earlier export "
                              f"folder")
    try:
        marked = all(json.loads((path / "config.json").read_text()).get(k) == v for k, v in EXPORT_MARK.items())
    except (OSError, ValueError, AttributeError):  # no config.json, not JSON, not an object
        marked = False
    if not marked:
        raise FileExistsError(f"{path}: not empty and not a lima-core export (its config.json lacks "
                              f"\"exported_by\": \"lima-core\"); save_pretrained replaces the whole folder, so it "
                              f"writes only into a new, empty or earlier export folder")


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


# ---- sharded models (lima_core.parallel.fsdp): streaming export, sliced import -----------------------


def save_sharded(sharded: FSDP, cfg: ModelConfig, path: str | Path, tokenizer=None, *,
                 dtype: torch.dtype = torch.float32, sampling: SamplingConfig = SamplingConfig(),
                 max_shard_bytes: int = 5 * 2**30):
    """Export a sharded model in HF format in `dtype`; a collective (every rank calls it).

    Units are gathered one at a time, already cast to `dtype`, and the safetensors files are
    written by the ranks in turn (file i by rank i mod world), so no rank holds more than one
    file's worth of tensors and the writing is spread over the ranks. Like the train state,
    this needs the run folder on a filesystem every rank sees. The folder appears atomically,
    for every rank once this returns (sharded.collective_dir).
    """
    files = shard_files([unit.numel * (torch.finfo(dtype).bits // 8) for unit in sharded.units], max_shard_bytes)
    with collective_dir(path, sharded.rank, sharded.group) as tmp:
        weight_map, total = {}, 0
        for i, (name, members) in enumerate(files):
            tensors = {}
            for unit in (sharded.units[u] for u in members):  # a collective: every rank gathers every unit
                tensors.update({hf_key(k): v.cpu() for k, v in sharded.full_tensors(unit, dtype).items()})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(nbytes(t) for t in tensors.values())
            if i % sharded.world == sharded.rank:
                save_file(tensors, tmp / name, metadata=SAFETENSORS_METADATA)
        if sharded.rank == 0:
            write_index(tmp, weight_map, total)
            _write_configs(tmp, cfg, dtype, tokenizer, sampling)


_STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, **_FLOAT_DTYPES}


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint is stored in: its config.json's `dtype` (transformers 5) or
    `torch_dtype` (4), else its first stored tensor's."""
    path = Path(path)
    d = _config_json(path)
    name = d.get("dtype") or d.get("torch_dtype")
    if name is None:
        first = next(iter(_read_headers(_weight_files(path)[0][:1]).values()), None)
        name = None if first is None else first.dtype
    if not isinstance(name, str) or name not in _STORED_DTYPES:
        raise CheckpointError(f"{path / 'config.json'}: weights stored as {name!r}; float32, bfloat16 and float16 "
                              f"are supported")
    return _STORED_DTYPES[name]


@torch.no_grad()
def load_sharded(sharded: FSDP, path: str | Path):
    """Fill a sharded model (built on the meta device) from an HF checkpoint, each rank reading
    only the rows its shards cover (safe_open + get_slice). Every header is checked first, so a
    bad checkpoint is refused before any shard is written. Rows beyond the checkpoint's
    vocabulary (a grown vocabulary) get the mean of the checkpoint's rows, read in chunks."""
    path = Path(path)
    _, stored = _inspect(path)
    slots = [(unit, slot, hf_key(slot.name)) for unit in sharded.units for slot in unit.slots]
    _check_tensors(stored, {key: tuple(slot.shape) for _, slot, key in slots}, "the model has", lacks=path,
                   grown_vocab=True)
    with ExitStack() as stack:
        handles = {}
        for unit, slot, key in slots:
            file = stored[key].file
            if file not in handles:
                handles[file] = stack.enter_context(_open(file))
            _load_slot(unit, slot, handles[file].get_slice(key))


def _load_slot(unit, slot, tensor_slice):
    """Copy the part of one parameter that falls in this rank's shard. The stored tensor is the
    slot's shape, or (the vocabulary only, checked by load_sharded) has fewer rows."""
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
