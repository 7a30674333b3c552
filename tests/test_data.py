"""The data path: encoding with EOT and the loss mask, packing, validation errors, and the
invariance of the gradient to packing and gradient accumulation."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import ASSETS
from lima_core.config import ModelConfig
from lima_core.data import IGNORE, DataError, encode_conversation, pack, read_conversations
from lima_core.model import Llama
from lima_core.tokenizer import Tokenizer
from lima_core.train import step_loss


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(ASSETS / "tokenizer.model")


def test_loss_covers_assistant_tokens_and_their_eot_only(tok):
    turns = ["Hi there.", "Hello! How can I help?", "Tell me a joke.", "Why did the chicken cross the road?"]
    ex = encode_conversation(tok, turns, max_len=2048)
    pieces = [tok.encode(t) + [tok.eot_id] for t in turns]
    assert ex.ids == [tok.bos_id] + [i for p in pieces for i in p]
    # Targets (the tokens predicted) are exactly the assistant turns and their EOTs.
    expected_targets = pieces[1] + pieces[3]
    assert [l for l in ex.labels if l != IGNORE] == expected_targets
    assert sum(i == tok.eot_id for i in expected_targets) == 2
    assert ex.labels[-1] == IGNORE  # nothing follows the last token


def test_truncation_at_max_len(tok):
    ex = encode_conversation(tok, ["word " * 50, "answer " * 50], max_len=20)
    assert len(ex.ids) == len(ex.labels) == 20


def test_packed_rows_restart_positions_and_mark_examples(tok):
    examples = [encode_conversation(tok, ["q" * n, "a" * n], 2048) for n in (3, 40, 7, 1)]
    lengths = [len(e.ids) for e in examples]
    rows = pack(examples, max_len=lengths[0] + lengths[1])
    assert [r.cu_seqlens.tolist() for r in rows] == [
        [0, lengths[0], lengths[0] + lengths[1]], [0, lengths[2], lengths[2] + lengths[3]]]
    assert rows[0].positions[0].tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    assert rows[1].tokens[0].tolist() == examples[2].ids + examples[3].ids


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"conversations": ["Hello?", "Hi!"], "source": "test"})


@pytest.mark.parametrize("bad, message", [
    ('{"conversations": ["a", "b"', "not valid JSON"),
    ('{"source": "x"}', "missing field 'conversations'"),
    ('{"conversations": ["only the user"]}', "at least two turns"),
    ('{"conversations": ["a", "b", "c"]}', "ends with a user turn"),
    ('{"conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "must alternate"),
    ('{"conversations": ["a", 7]}', "turn 2 must be a non-empty string"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_a_bad_line_names_the_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read_conversations(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_role_content_turns_are_accepted(tmp_path):
    line = json.dumps({"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    assert read_conversations(write_lines(tmp_path / "d.jsonl", [line])) == [["a", "b"]]


def test_the_trainer_exits_2_on_bad_data_and_leaves_no_run_folder(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, "{oops", GOOD])
    result = subprocess.run([sys.executable, "-m", "lima_core.train", "--data", str(path),
                             "--out-dir", str(tmp_path / "runs")], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{path}:3:" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_gradient_does_not_depend_on_packing_or_accumulation(tok):
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=32, n_heads=4, n_kv_heads=2,
                                        ffn_dim=48, n_layers=2))
    model.init_weights(torch.Generator().manual_seed(0))
    turns = [json.loads(line)["conversations"] for line in (ASSETS / "train.jsonl").read_text().splitlines()[:6]]
    batch = [encode_conversation(tok, t, 2048) for t in turns]

    def grads(max_len):
        model.zero_grad()
        loss_sum, n, _ = step_loss(model, batch, max_len, torch.device("cpu"), None, torch.float32)
        return float(loss_sum) / n, [p.grad.clone() for p in model.parameters()]

    one_row = grads(max_len=sum(len(e.ids) for e in batch))  # everything packed in one row
    per_example = grads(max_len=max(len(e.ids) for e in batch))  # one example a micro-batch
    assert len(pack(batch, max(len(e.ids) for e in batch))) == len(batch)
    assert one_row[0] == pytest.approx(per_example[0], rel=1e-6)  # fp32 sums in another order
    for a, b in zip(one_row[1], per_example[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)  # fp32 sums in another order
