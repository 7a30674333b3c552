"""Configuration: sections, precedence (defaults < TOML < flags), LIMA's defaults and size rules,
and a one-line error naming the file:line or the flag for every bad input."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lima_core.cli import _SECTIONS, load_config
from lima_core.config import Config, ConfigError
from lima_core.model.shapes import PRESETS, ModelConfig


def test_defaults_are_the_lima_recipe():
    cfg = Config()
    assert (cfg.train.epochs, cfg.train.max_len, cfg.optim.lr, cfg.optim.lr_end) == (15, 2048, 1e-5, 1e-6)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.95, 0.1)
    s = cfg.sampling
    assert (s.top_p, s.temperature, s.repetition_penalty, s.max_new_tokens) == (0.9, 0.7, 1.2, 2048)


def test_lima_size_rules():
    t = Config().train
    assert (t.residual_dropout(int(65e9)), t.residual_dropout(int(7e9))) == (0.3, 0.2)
    assert (t.global_batch(int(33e9)), t.global_batch(int(13e9))) == (32, 64)
    t = load_config(["--dropout", "0.1", "--batch-size", "8"]).train
    assert (t.residual_dropout(int(65e9)), t.global_batch(int(65e9))) == (0.1, 8)


def test_param_dtype_follows_dtype_unless_set():
    assert load_config([]).param_dtype == torch.float32
    assert load_config(["--dtype", "bf16"]).param_dtype == torch.bfloat16
    assert load_config(["--dtype", "bf16", "--param-dtype", "fp32"]).param_dtype == torch.float32


def test_precedence_defaults_toml_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nepochs = 3\n\n[optim]\nlr = 2e-5\n\n[sampling]\ntemperature = 0.5\n')
    cfg = load_config(["--config", str(toml), "--epochs", "4", "--select-epochs", "[2, 3]"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.optim.beta2, cfg.sampling.temperature) == (2e-5, 4, 0.95, 0.5)
    assert cfg.train.select_epochs == (2, 3)


BAD_TOML = [
    # (file text, what the one-line error must say)
    ('[train]\nepochs = 3\nlearning_rate = 2e-5\n', "run.toml:3: unknown key 'learning_rate' in [train]"),
    ('[train]\nepochs = 3\n\n[optim]\nlr = -1\n',
     "run.toml:5: optim.lr = -1: Input should be greater than or equal to 0"),
    ('[trian]\nepochs = 3\n', "run.toml:1: unknown table [trian]"),
    ('[train]\ndtype = "fp16"\n', "run.toml:2: train.dtype = 'fp16': Input should be 'fp32' or 'bf16'"),
    ('[parallel]\ncheckpointing = "full"\n', "run.toml:2: parallel.checkpointing = 'full'"),
    ('[train\n', "run.toml: "),
]


@pytest.mark.parametrize("text, message", BAD_TOML)
def test_a_bad_toml_names_file_and_line(tmp_path, text, message):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(["--config", str(toml)])
    assert message in str(error.value) and "\n" not in str(error.value)


BAD_FLAGS = [
    (["--epochs", "zero"], "--epochs: train.epochs = 'zero': Input should be a valid integer"),
    (["--epochs", "0"], "--epochs: train.epochs = 0: Input should be greater than or equal to 1"),
    (["--dropout", "1.5"], "--dropout: train.dropout = 1.5: must be in [0, 1), or -1"),
    (["--select-epochs", "[6, 2]"], "--select-epochs: train.select_epochs = [6, 2]: must be [first, last]"),
    (["--top-p", "0"], "--top-p: sampling.top_p = 0: Input should be greater than 0"),
    (["--moment-dtype", "int8"], "--moment-dtype: optim.moment_dtype = 'int8'"),
    (["--plot", "maybe"], "--plot: train.plot = 'maybe': Input should be a valid boolean"),
    (["--tensorboard", "maybe"], "--tensorboard: train.tensorboard = 'maybe': Input should be a valid boolean"),
    (["--max-new-tokens", "0"], "--max-new-tokens: sampling.max_new_tokens = 0: Input should be greater than"),
    (["--param-dtype", "fp16"], "--param-dtype: parallel.param_dtype = 'fp16'"),
    (["--kernels", "cuda"], "--kernels: train.kernels = 'cuda'"),
    (["--export-dtype", "fp16"], "--export-dtype: train.export_dtype = 'fp16'"),
    (["--export-epochs", "some"], "--export-epochs: train.export_epochs = 'some'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS)
def test_a_bad_flag_is_named(argv, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(argv)
    assert message in str(error.value)


def test_the_trainer_exits_2_on_a_bad_flag_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lima_core.train", "--epochs", "zero",
                             "--out-dir", str(tmp_path / "r")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--epochs" in result.stderr and not (tmp_path / "r").exists()


def test_a_checkpoint_gets_no_toy_data(tmp_path):
    """The bundled samples serve presets; a real checkpoint must name its data and is not
    evaluated on the toy dev set unless asked to."""
    t = load_config(["--model", str(tmp_path)]).train
    with pytest.raises(ConfigError, match="--model .* is a checkpoint: name its training data with --data"):
        t.data_files(from_checkpoint=True)
    t = load_config(["--model", str(tmp_path), "--data", "mine.jsonl"]).train
    assert t.data_files(from_checkpoint=True) == ("mine.jsonl", "")
    data, dev = load_config([]).train.data_files(from_checkpoint=False)
    assert data.endswith("assets/train.jsonl") and dev.endswith("assets/dev.jsonl")


def test_the_chat_command_exits_2_on_a_bad_sampling_flag(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lima_core.chat", "--checkpoint", str(tmp_path), "--prompt", "hi",
                             "--top-p", "2"], capture_output=True, text=True)
    assert result.returncode == 2 and "--top-p: sampling.top_p = 2" in result.stderr


def test_presets_have_their_published_sizes():
    sizes = {name: ModelConfig.from_name(name).num_params() / 1e9 for name in PRESETS}
    # Published parameter counts (billions), to the precision the papers give them.
    for name, billions in {"llama-7b": 6.7, "llama-13b": 13.0, "llama-33b": 32.5, "llama-65b": 65.2,
                           "llama-2-70b": 69.0, "llama-3-8b": 8.0, "llama-3-70b": 70.6}.items():
        assert sizes[name] == pytest.approx(billions, rel=0.02), name


# ---- fuzzing: whatever the file or the flags say, a Config or a ConfigError, nothing else ----

KEYS = [(section, key) for section, model in _SECTIONS.items() for key in model.model_fields]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.lists(st.integers(-5, 20), max_size=3))


def toml_value(v) -> str | None:
    """v as a TOML value (None: TOML has no null, so the key is left out)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string (a lone surrogate: TOML refuses it)
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS + [("train", "nonsense"), ("nowhere", "lr")]), VALUES), max_size=6))
def test_fuzzed_toml_files_give_a_config_or_a_config_error(tmp_path_factory, entries):
    tables: dict[str, list[str]] = {}
    for (section, key), value in entries:
        text = toml_value(value)
        if text is not None:
            tables.setdefault(section, []).append(f"{key} = {text}")
    body = "".join(f"[{s}]\n" + "\n".join(dict.fromkeys(lines)) + "\n" for s, lines in tables.items())
    path = tmp_path_factory.mktemp("fuzz") / "run.toml"
    path.write_text(body)
    try:
        load_config(["--config", str(path)])
    except ConfigError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=10)), max_size=5))
def test_fuzzed_flags_give_a_config_or_a_config_error(flags):
    argv = [a for (_, key), text in flags for a in (f"--{key.replace('_', '-')}", text)]
    try:
        load_config(argv)
    except ConfigError as e:
        assert "\n" not in str(e)
    except SystemExit as e:  # argparse: a flag value that looks like a flag ("--x") is a usage error
        assert e.code == 2
