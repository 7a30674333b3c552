"""The data path: encoding with EOT and the loss mask, packing, validation errors, and the
invariance of the gradient to packing and gradient accumulation."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from helpers import ASSETS

from lima_core.data import packing
from lima_core.data.encode import IGNORE, Example, check_targets, encode_conversation, prompt_ids
from lima_core.data.formats import Conversation, DataError, read_conversations
from lima_core.data.packing import in_order, pack
from lima_core.data.tokenizer import Tokenizer
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.train.loop import forward_backward


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
    assert [label for label in ex.labels if label != IGNORE] == expected_targets
    assert sum(i == tok.eot_id for i in expected_targets) == 2
    assert ex.labels[-1] == IGNORE  # nothing follows the last token


def test_truncation_at_max_len(tok):
    ex = encode_conversation(tok, ["word " * 50, "answer " * 50], max_len=20)
    assert len(ex.ids) == len(ex.labels) == 20


def reference_encoding(tok, system: str | None, turns: list[str], max_len: int) -> Example:
    """Token by token: BOS, each utterance and its EOT; a token is a target when it belongs to an
    assistant turn (odd turn index); cut at max_len before the labels are read off."""
    tokens = [(tok.bos_id, False)]
    utterances = ([(system, False)] if system is not None else []) + [(t, i % 2 == 1) for i, t in enumerate(turns)]
    for text, assistant in utterances:
        tokens += [(i, assistant) for i in tok.encode(text)] + [(tok.eot_id, assistant)]
    tokens = tokens[:max_len]
    ids = [i for i, _ in tokens]
    labels = [tokens[t + 1][0] if t + 1 < len(tokens) and tokens[t + 1][1] else IGNORE for t in range(len(tokens))]
    return Example(ids, labels)


@pytest.mark.parametrize("max_len", [2, 5, 9, 12, 17, 30, 2048])
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_encoding_against_a_token_by_token_reference(tok, system, max_len):
    turns = ["Hi there.", "Hello!", "Tell me a joke.", "No."]
    ours = encode_conversation(tok, Conversation(turns, system), max_len)
    assert ours == reference_encoding(tok, system, turns, max_len)
    if system is None:
        assert encode_conversation(tok, turns, max_len) == ours  # a plain list: no system turn


def test_a_system_turn_comes_first_ends_with_eot_and_is_trained_on_nothing(tok):
    system, turns = "Answer in one word.", ["Capital of France?", "Paris."]
    ex = encode_conversation(tok, Conversation(turns, system), 2048)
    head = [tok.bos_id] + tok.encode(system) + [tok.eot_id]
    assert ex.ids[:len(head)] == head
    assert ex.ids[len(head):] == encode_conversation(tok, turns, 2048).ids[1:]
    assert [label for label in ex.labels if label != IGNORE] == tok.encode("Paris.") + [tok.eot_id]
    prompt = Conversation(turns, system).prompt
    assert prompt.turns == turns[:1] and prompt.system == system
    assert prompt_ids(tok, prompt) == head + tok.encode(turns[0]) + [tok.eot_id]


def test_conversations_that_lose_every_target_are_named(tok):
    # max_len 12: a long first user turn pushes the assistant's first token past it.
    def at(line: int, turns: list[str]) -> Conversation:
        return Conversation(turns, None, "d.jsonl", line)

    short, long = ["Hi?", "Yes."], ["word " * 20, "yes"]
    conversations = [at(2, short), at(3, long), at(5, short)] + [at(n, long) for n in range(8, 18)]
    examples = [encode_conversation(tok, c, 12) for c in conversations]
    assert [len(e.ids) for e in examples] == [10, 12, 10] + [12] * 10
    assert check_targets(conversations[::2][:2], examples[::2][:2], 12) is None
    assert check_targets(conversations[:12], examples[:12], 12) == (
        "d.jsonl: 10 of 12 conversations have no assistant token within --max-len 12 and are trained on nothing "
        "(lines 3, 8, 9, 10, 11, 12, 13, 14, 15, 16)")
    assert check_targets(conversations, examples, 12).endswith(
        "11 of 13 conversations have no assistant token within --max-len 12 and are trained on nothing "
        "(lines 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, ...)")
    with pytest.raises(DataError) as err:
        check_targets(conversations[3:], examples[3:], 12)
    assert str(err.value) == ("d.jsonl: every conversation (10) starts its assistant turns past --max-len 12: "
                              "nothing to train on or measure (raise --max-len or shorten the prompts, from line 8)")


def example(n: int, first_id: int) -> Example:
    """n distinct token ids from first_id, a target on every position but the last."""
    ids = list(range(first_id, first_id + n))
    return Example(ids, ids[1:] + [IGNORE])


def test_packed_rows_restart_positions_and_mark_examples():
    # Best-fit decreasing into rows of 10: 8 opens a row, 6 a second, 3 joins the 6 (8 + 3 > 10),
    # 1 fits both and joins the fuller (6 + 3 = 9 against 8). In order it takes three rows.
    examples = [example(n, 100 * k) for k, n in enumerate((3, 8, 1, 6))]
    rows = pack(examples, max_len=10)
    assert [r.cu_seqlens.tolist() for r in rows] == [[0, 8], [0, 6, 9, 10]]
    assert rows[1].tokens[0].tolist() == examples[3].ids + examples[0].ids + examples[2].ids
    assert rows[1].labels[0].tolist() == examples[3].labels + examples[0].labels + examples[2].labels
    assert rows[1].positions[0].tolist() == list(range(6)) + list(range(3)) + list(range(1))
    assert [r.max_seqlen for r in rows] == [8, 6]


def test_where_best_fit_decreasing_loses_the_order_is_kept():
    # 3, 3, 2, 2, 2, 2 by BFD into rows of 7: [3, 3], [2, 2, 2], [2]; in order, two full rows.
    examples = [example(n, 100 * k) for k, n in enumerate((3, 2, 2, 3, 2, 2))]
    rows = pack(examples, max_len=7)
    assert [r.tokens[0].tolist() for r in rows] == [examples[0].ids + examples[1].ids + examples[2].ids,
                                                   examples[3].ids + examples[4].ids + examples[5].ids]


def greedy_in_order(lengths: list[int], max_len: int) -> list[list[int]]:
    """The reference: the packing lima-core used before best-fit decreasing."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return rows + [current] if current else rows


def test_the_in_order_packer_is_the_plain_loop_on_random_sizes():
    """in_order packs rows and checkpoint files alike (checkpoint.sharded)."""
    rng = random.Random(0)
    for case in range(500):
        capacity = rng.choice([1, 7, 100, 2**20])
        # zero sizes, exact fits and items larger than a bin: a bin of their own
        sizes = [rng.choice([0, rng.randint(1, capacity), capacity, 3 * capacity]) for _ in range(rng.randint(0, 60))]
        bins = in_order(sizes, capacity)
        assert bins == greedy_in_order(sizes, capacity), (case, capacity, sizes)
        assert [i for b in bins for i in b] == list(range(len(sizes)))
        assert all(len(b) == 1 or sum(sizes[i] for i in b) <= capacity for b in bins), (case, sizes)


def random_lengths(rng: random.Random, max_len: int) -> list[int]:
    """A batch: uniform lengths, LIMA-like lognormal ones truncated at max_len, or many equal ones."""
    size = rng.randint(1, 80)
    shape = rng.choice(["uniform", "lognormal", "equal"])
    if shape == "uniform":
        return [rng.randint(1, max_len) for _ in range(size)]
    if shape == "lognormal":
        return [min(max_len, max(1, round(rng.lognormvariate(math.log(max_len) - 1.6, 1.0)))) for _ in range(size)]
    return [rng.randint(1, max_len)] * size


def test_packing_properties_on_random_batches():
    rng = random.Random(0)
    fewer = 0
    for case in range(400):
        max_len = rng.choice([7, 16, 100, 2048])
        lengths = random_lengths(rng, max_len)
        examples = [example(n, 10_000 * k) for k, n in enumerate(lengths)]
        rows = pack(examples, max_len)
        greedy = greedy_in_order(lengths, max_len)
        # Every example exactly once, whole, with its labels and positions from 0.
        seen = []
        for row in rows:
            bounds = row.cu_seqlens.tolist()
            assert bounds[-1] == row.tokens.shape[1] <= max_len, (case, lengths)
            assert row.max_seqlen == max(b - a for a, b in zip(bounds, bounds[1:]))
            for a, b in zip(bounds, bounds[1:]):
                k = int(row.tokens[0, a]) // 10_000
                assert row.tokens[0, a:b].tolist() == examples[k].ids
                assert row.labels[0, a:b].tolist() == examples[k].labels
                assert row.positions[0, a:b].tolist() == list(range(b - a))
                seen.append(k)
        assert sorted(seen) == list(range(len(examples))), (case, lengths)
        assert math.ceil(sum(lengths) / max_len) <= len(rows) <= len(greedy), (case, lengths)
        fewer += len(rows) < len(greedy)
        assert [r.tokens.tolist() for r in pack(examples, max_len)] == [r.tokens.tolist() for r in rows]
    assert fewer > 100  # the cases are not all ones where the order was already best


def test_an_example_longer_than_max_len_gets_a_row_of_its_own():
    rows = pack([example(5, 0), example(12, 100), example(4, 200)], max_len=10)
    assert sorted(r.cu_seqlens.tolist() for r in rows) == [[0, 5, 9], [0, 12]]


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
    ('{"conversations": ["a", 7]}', "turn 2 is a number where turn 1 is a string"),
    ('{"conversations": ["a", " "]}', "turn 2 must have non-empty text"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_a_bad_line_names_the_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="blank"):
        read_conversations(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_role_content_turns_are_accepted(tmp_path):
    line = json.dumps({"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = write_lines(tmp_path / "d.jsonl", [line])
    assert read_conversations(path) == [Conversation(["a", "b"], None, str(path), 1)]


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
        loss_sum, n, _ = forward_backward(model, batch, max_len, torch.device("cpu"), None, torch.float32)
        return float(loss_sum) / n, [p.grad.clone() for p in model.parameters()]

    one_row = grads(max_len=sum(len(e.ids) for e in batch))  # everything packed in one row
    per_example = grads(max_len=max(len(e.ids) for e in batch))  # one example a micro-batch
    assert len(pack(batch, max(len(e.ids) for e in batch))) == len(batch)
    assert one_row[0] == pytest.approx(per_example[0], rel=1e-6)  # fp32 sums in another order
    for a, b in zip(one_row[1], per_example[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)  # fp32 sums in another order


def test_the_global_batch_loss_and_gradient_do_not_depend_on_the_packing(tok, monkeypatch):
    # forward_backward divides every row's summed loss by the target count of the whole global batch,
    # so best-fit decreasing and the in-order packing it replaced give the same loss and gradient.
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=32, n_heads=4, n_kv_heads=2,
                                        ffn_dim=48, n_layers=2))
    model.init_weights(torch.Generator().manual_seed(0))
    batch = [encode_conversation(tok, t, 2048) for t in read_conversations(ASSETS / "train.jsonl")[:12]]
    max_len = 750  # 4 rows by best-fit decreasing, 5 in order

    def grads():
        model.zero_grad()
        loss_sum, n, tokens = forward_backward(model, batch, max_len, torch.device("cpu"), None, torch.float32)
        return float(loss_sum) / n, [p.grad.clone() for p in model.parameters()], (n, tokens)

    def in_order(examples, max_len):
        rows = greedy_in_order([len(e.ids) for e in examples], max_len)
        return [packing._row([examples[i] for i in row]) for row in rows]

    best_fit, bfd_rows = grads(), len(pack(batch, max_len))
    monkeypatch.setattr(packing, "pack", in_order)
    before, greedy_rows = grads(), len(packing.pack(batch, max_len))
    assert bfd_rows < greedy_rows  # the packings differ, so the test says something
    assert best_fit[2] == before[2]
    assert best_fit[0] == pytest.approx(before[0], rel=1e-6)  # fp32 sums in another order
    for a, b in zip(best_fit[1], before[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)  # fp32 sums in another order
