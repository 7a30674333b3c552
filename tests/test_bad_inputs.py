"""Nothing silent: every bad setting, bad run folder and fault, run in-process through the same
entry points as the command line (`lima_core.train`, `lima_core.plan`, `lima_core.chat`).

Each case says what the user did, the exit status, and a fragment of the one-line message that
must name the cause; and every case of exit status 2 writes nothing. The bad data and bad
checkpoint tables live beside their modules' tests (tests/test_bad_data.py,
tests/test_bad_checkpoints.py) and use the same runner (helpers.run_entry).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from helpers import ASSETS, run_entry
from safetensors.torch import load_file

from lima_core import chat
from lima_core.checkpoint.hf import save_pretrained
from lima_core.checkpoint.state import complete_states
from lima_core.data.tokenizer import Tokenizer
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.planning import cli as plan
from lima_core.train import loop as train


def small_data(folder: Path, n: int = 4) -> Path:
    data = folder / "train.jsonl"
    data.write_text("".join(line + "\n" for line in (ASSETS / "train.jsonl").read_text().splitlines()[:n]))
    return data


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    """A run of the tiny preset small enough to take a few seconds."""
    return ["--data", str(small_data(tmp_path)), "--dev-data", "", "--out-dir", str(tmp_path / "runs"), "--name", "t",
            "--epochs", "1", "--batch-size", "2", "--max-len", "256", "--plot", "false", "--lr", "1e-3", *extra]


def toml(tmp_path: Path, text: str) -> list[str]:
    """A run configured by a TOML file (and only the flags that keep it off the watched folder)."""
    path = tmp_path / "run.toml"
    path.write_text(text)
    return ["--config", str(path), "--out-dir", str(tmp_path / "runs")]


# (case, argv builder (tmp_path -> argv), message fragment); all exit 2 and write nothing.
BAD_SETTINGS = [
    ("lr as a string in TOML", lambda p: toml(p, '[optim]\nlr = "1e-3"\n'),
     "run.toml:2: optim.lr = '1e-3': Input should be a valid number"),
    ("fractional epochs in TOML", lambda p: toml(p, "[train]\nepochs = 1.5\n"),
     "run.toml:2: train.epochs = 1.5: Input should be a valid integer"),
    ("a number as the name", lambda p: toml(p, "[train]\nname = 5\n"),
     "run.toml:2: train.name = 5: Input should be a valid string"),
    ("resume = true", lambda p: toml(p, "[train]\nresume = true\n"),
     "run.toml:2: train.resume = True: Input should be a valid string"),
    ("data as a list", lambda p: toml(p, '[train]\ndata = ["a.jsonl"]\n'),
     "run.toml:2: train.data = ['a.jsonl']: Input should be a valid string"),
    ("lr nan", lambda p: train_args(p, "--lr", "nan"), "--lr: optim.lr = nan: Input should be a finite number"),
    ("lr inf", lambda p: train_args(p, "--lr", "inf"), "--lr: optim.lr = inf: Input should be a finite number"),
    ("lr negative", lambda p: train_args(p, "--lr", "-1"),
     "--lr: optim.lr = -1: Input should be greater than or equal to 0"),
    ("beta1 above 1", lambda p: train_args(p, "--beta1", "1.5"),
     "--beta1: optim.beta1 = 1.5: Input should be less than 1"),
    ("negative weight decay", lambda p: train_args(p, "--weight-decay", "-1"),
     "--weight-decay: optim.weight_decay = -1"),
    ("negative gradient clip", lambda p: train_args(p, "--grad-clip", "-1"), "--grad-clip: optim.grad_clip = -1"),
    ("negative temperature", lambda p: train_args(p, "--temperature", "-1"),
     "--temperature: sampling.temperature = -1"),
    ("negative repetition penalty", lambda p: train_args(p, "--repetition-penalty", "-1"),
     "--repetition-penalty: sampling.repetition_penalty = -1: Input should be greater than 0"),
    ("top-p above 1", lambda p: train_args(p, "--top-p", "1.5"), "--top-p: sampling.top_p = 1.5"),
    ("negative answer length", lambda p: train_args(p, "--max-new-tokens", "-1"),
     "--max-new-tokens: sampling.max_new_tokens = -1"),
    ("seed past 64 bits", lambda p: train_args(p, "--seed", str(2**70)), "--seed: train.seed = 1180591620717411303424"),
    ("seed as an expression", lambda p: train_args(p, "--seed", "2**70"),
     "--seed: train.seed = '2**70': Input should be a valid integer"),
    ("max-len 1", lambda p: train_args(p, "--max-len", "1"),
     "--max-len: train.max_len = 1: Input should be greater than or equal to 2"),
    ("empty name", lambda p: train_args(p, "--name", ""), "--name: train.name = '': must be a folder name"),
    ("name that climbs out", lambda p: train_args(p, "--name", "../x"),
     "--name: train.name = '../x': must be a folder name"),
    ("bf16 moments without the native AdamW",
     lambda p: train_args(p, "--moment-dtype", "bf16", "--fused-adamw", "false"),
     "--moment-dtype bf16 needs the native AdamW: it cannot go with --fused-adamw false"),
    ("resume and overwrite", lambda p: train_args(p, "--resume", "auto", "--overwrite", "true"),
     "--resume and --overwrite contradict each other"),
    ("cuda where there is none", lambda p: train_args(p, "--device", "cuda"),
     "--device cuda: torch sees no CUDA device"),
    ("max-len beyond the context", lambda p: train_args(p, "--max-len", "4096"),
     "--max-len 4096 is beyond the model's context (2048 positions)"),
    ("an unknown model", lambda p: train_args(p, "--model", "llama-9b"),
     "--model 'llama-9b' is neither a checkpoint folder"),
    ("out-dir is a file", lambda p: train_args(p, "--out-dir", str(ASSETS / "train.jsonl")), "is a file, not a folder"),
    ("resume from nowhere", lambda p: train_args(p, "--resume", str(p / "nowhere")),
     "nowhere: not a readable train state"),
    ("a negative node size", lambda p: train_args(p, "--node-size", "-1"),
     "--node-size: parallel.node_size = -1: Input should be greater than or equal to 0"),
    ("a node size the ranks do not fill", lambda p: train_args(p, "--node-size", "3"),
     "--node-size 3: the 1 ranks do not split into nodes of 3"),
    ("an unknown sharding", lambda p: train_args(p, "--sharding", "ring"),
     "--sharding: parallel.sharding = 'ring': Input should be 'flat' or 'two-level'"),
    ("an unknown dev-generation layout", lambda p: train_args(p, "--dev-decode", "fast"),
     "--dev-decode: parallel.dev_decode = 'fast': Input should be 'auto', 'node' or 'gather'"),
    ("count-bytes not a boolean", lambda p: train_args(p, "--count-bytes", "maybe"),
     "--count-bytes: parallel.count_bytes = 'maybe': Input should be a valid boolean"),
]


@pytest.mark.parametrize("case, argv, message", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_a_bad_setting_stops_before_anything_is_written(tmp_path, case, argv, message):
    outcome = run_entry(train.main, argv(tmp_path), tmp_path)
    assert outcome.status == 2, outcome.err
    assert message in outcome.err, outcome.err
    assert outcome.err.count("\n") == 1 and outcome.err.startswith("error: ")  # one line
    assert outcome.written == [] and not (tmp_path / "runs").exists()


def test_triton_kernels_on_the_cpu_without_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    outcome = run_entry(train.main, train_args(tmp_path, "--kernels", "triton"), tmp_path)
    assert outcome.status == 2 and "--kernels triton needs a GPU (or TRITON_INTERPRET=1" in outcome.err
    assert outcome.written == []


# ---- the run folder belongs to one run -------------------------------------------------------


@pytest.fixture
def finished(tmp_path):
    """A finished one-epoch run in tmp_path/runs/t, with a train state after every step."""
    outcome = run_entry(train.main, train_args(tmp_path, "--save-every", "1"), tmp_path)
    assert outcome.status == 0, outcome.err
    return tmp_path / "runs" / "t"


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    (tmp_path / "runs" / "t").mkdir(parents=True)
    with FileLock(tmp_path / "runs" / "t" / ".lock"):  # the first run holds it
        outcome = run_entry(train.main, train_args(tmp_path), tmp_path)
    assert outcome.status == 2 and "is in use by another run" in outcome.err and outcome.written == []


def test_a_fresh_run_over_an_earlier_one_is_refused_then_overwrites_when_asked(tmp_path, finished):
    outcome = run_entry(train.main, train_args(tmp_path), tmp_path)
    assert outcome.status == 2 and outcome.written == []
    assert "holds an earlier run (epoch-1, metrics.jsonl, state, summary.json)" in outcome.err
    (finished / "notes.txt").write_text("mine")
    outcome = run_entry(train.main, train_args(tmp_path, "--overwrite", "true", "--epochs", "2"), tmp_path)
    assert outcome.status == 0 and "--overwrite: deleted the earlier run's" in outcome.err
    assert (finished / "notes.txt").read_text() == "mine"  # only lima-core's outputs go
    assert len(json.loads((finished / "summary.json").read_text())["epochs"]) == 2


RESUME_MISMATCHES = [
    ("other data", lambda p: ["--data", str(small_data(p / "other", 3))], "data '"),
    ("other batch size", lambda p: ["--batch-size", "1"], "batch_size 2 then, 1 now"),
    ("other epochs", lambda p: ["--epochs", "3"], "epochs 1 then, 3 now"),
    ("other seed", lambda p: ["--seed", "7"], "seed 1234 then, 7 now"),
    ("other length", lambda p: ["--max-len", "200"], "max_len 256 then, 200 now"),
]


@pytest.mark.parametrize("case, extra, message", RESUME_MISMATCHES, ids=[c[0] for c in RESUME_MISMATCHES])
def test_resuming_another_run_is_refused_naming_the_difference(tmp_path, finished, case, extra, message):
    (tmp_path / "other").mkdir()
    outcome = run_entry(train.main, train_args(tmp_path, "--resume", "auto", *extra(tmp_path)), tmp_path)
    assert outcome.status == 2 and outcome.written == []
    assert "the state was saved for another run" in outcome.err and message in outcome.err, outcome.err
    assert "--force-resume true" in outcome.err


def test_force_resume_continues_with_a_warning(tmp_path, finished):
    outcome = run_entry(train.main, train_args(tmp_path, "--resume", "auto", "--epochs", "2", "--force-resume", "true"),
                        tmp_path)
    assert outcome.status == 0 and "warning: --resume" in outcome.err
    assert "continuing because of --force-resume" in outcome.err


# ---- faults ----------------------------------------------------------------------------------


def test_an_unreadable_newest_state_falls_back_to_the_one_before(tmp_path, finished):
    newest, previous = complete_states(finished / "state")[:2]
    (newest / "rank-0.safetensors").write_bytes(b"\x00" * 10)  # truncated
    outcome = run_entry(train.main, train_args(tmp_path, "--resume", "auto"), tmp_path)
    assert outcome.status == 0, outcome.err
    assert f"warning: {newest} cannot be read" in outcome.err and f"resumed from {previous}" in outcome.err


def test_a_users_copy_of_a_state_is_not_taken_for_one(tmp_path, finished):
    for state in complete_states(finished / "state"):
        state.rename(state.with_name(state.name + "-backup"))
    outcome = run_entry(train.main, train_args(tmp_path, "--resume", "auto", "--overwrite", "false"), tmp_path)
    assert outcome.status == 0, outcome.err
    assert "--resume auto: no complete train state" in outcome.err and "starting fresh" in outcome.err


def test_divergence_stops_before_the_update_and_exports_nothing_non_finite(tmp_path):
    outcome = run_entry(train.main, train_args(tmp_path, "--lr", "1e30", "--epochs", "3"), tmp_path)
    assert outcome.status == 1 and "stopped before the update" in outcome.err, outcome.err
    for export in (tmp_path / "runs" / "t").glob("epoch-*"):
        assert all(torch.isfinite(t).all() for t in load_file(export / "model.safetensors").values())


def test_ctrl_c_prints_one_line_exits_130_and_the_run_resumes(tmp_path, monkeypatch):
    real, calls = train.forward_backward, []

    def interrupted_at_step_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "forward_backward", interrupted_at_step_2)
    outcome = run_entry(train.main, train_args(tmp_path, "--save-every", "1"), tmp_path)
    last_line = outcome.err.strip().splitlines()[-1]
    assert outcome.status == 130 and last_line.startswith("lima-core: interrupted"), outcome.err
    monkeypatch.setattr(train, "forward_backward", real)
    outcome = run_entry(train.main, train_args(tmp_path, "--resume", "auto"), tmp_path)
    assert outcome.status == 0 and "resumed from" in outcome.err and "(step 1)" in outcome.err


def test_a_full_disk_names_the_path_and_leaves_no_state_to_mistake(tmp_path, monkeypatch):
    import lima_core.checkpoint.state as state_module

    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device", str(filename))

    monkeypatch.setattr(state_module, "save_file", disk_full)
    outcome = run_entry(train.main, train_args(tmp_path, "--save-every", "1"), tmp_path)
    assert outcome.status == 1 and "No space left on device" in outcome.err and ".tmp-step-1" in outcome.err
    assert complete_states(tmp_path / "runs" / "t" / "state") == []


# ---- the planner and generation --------------------------------------------------------------

BAD_PLANS = [
    (["--gpus", "0"], "--gpus: must be a positive integer"),
    (["--mfu", "0"], "--mfu: must be in (0, 1]"),
    (["--gpu-memory", "-80"], "--gpu-memory: must be a positive number"),
    (["--link-gbps", "nan"], "--link-gbps: must be a positive number"),
    (["--model", "llama-9b"], "unknown model preset 'llama-9b'"),
    (["--gpus", "12"], "--gpus 12 do not make whole nodes of 8 (--gpus-per-node)"),
    (["--gpus-per-node", "0"], "--gpus-per-node: must be a positive integer"),
    (["--nvlink-gbs", "-1"], "--nvlink-gbs: must be a positive number"),
    (["--hbm-gbs", "0"], "--hbm-gbs: must be a positive number"),
    (["--nvlink-latency-us", "-1"], "--nvlink-latency-us: must be a positive number"),
    (["--sharding", "ring"], "--sharding: invalid choice: 'ring'"),
    (["--dev-decode", "fast"], "--dev-decode: invalid choice: 'fast'"),
]


@pytest.mark.parametrize("argv, message", BAD_PLANS)
def test_a_bad_plan_request_is_named(tmp_path, argv, message):
    outcome = run_entry(plan.main, argv, tmp_path)
    assert outcome.status == 2 and message in outcome.err, outcome.err


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tok = Tokenizer(ASSETS / "tokenizer.model")
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=32, n_heads=4, ffn_dim=32, n_layers=1,
                                        max_seq_len=64))
    model.init_weights()
    path = tmp_path_factory.mktemp("export") / "ckpt"
    save_pretrained(model, path, tokenizer=tok)
    return path


BAD_GENERATIONS = [
    (["--max-new-tokens", "0"], "--max-new-tokens: sampling.max_new_tokens = 0"),
    (["--top-p", "1.5"], "--top-p: sampling.top_p = 1.5"),
    (["--temperature", "nan"], "--temperature: sampling.temperature = nan: Input should be a finite number"),
    (["--prompt", "word " * 80], "tokens: beyond the model's context (64 positions)"),
]


@pytest.mark.parametrize("argv, message", BAD_GENERATIONS)
def test_a_bad_generation_request_is_named(tmp_path, export, argv, message):
    base = ["--checkpoint", str(export), "--prompt", "Hi", "--max-new-tokens", "8"]
    outcome = run_entry(chat.main, base + argv, tmp_path)
    assert outcome.status == 2 and message in outcome.err, outcome.err


def test_the_python_generate_rejects_what_the_cli_rejects(export):
    from lima_core.checkpoint.hf import load_pretrained
    from lima_core.inference.decode import generate

    model = load_pretrained(export)
    for settings, message in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p"),
                              (dict(temperature=math.nan), "temperature"),
                              (dict(repetition_penalty=-1.0), "repetition"), (dict(temperature=-1.0), "temperature")]:
        with pytest.raises(ValueError, match=message):
            generate(model, [1, 5, 6, 7, 8], **settings)
    with pytest.raises(ValueError, match=r"a prompt of 64 tokens: beyond the model's context \(64 positions\)"):
        generate(model, [1] * 64)
    # Room for fewer new tokens than asked: the answer stops at the context's end.
    assert len(generate(model, [1] * 60, max_new_tokens=50, temperature=0)) == 4
