"""Dev generation on the node-local decode layout (lima_core.parallel.decode_layout), on 2 nodes x
2 gloo ranks emulated on this machine, against one process decoding the epoch's export.

One torchrun launch for the module (`launch`): this file is also the worker (`python
test_decode_layout.py SPEC` under torchrun). It runs two short trainer runs with `--dev-decode
node` (seeded sampling from the tiny preset; greedy from a tied checkpoint whose ffn_dim does
not split evenly), then decodes an export with `load_tensor_parallel`, and writes what the tests
read. The reference is one process: the export loaded whole (load_pretrained), each node's share
of the dev prompts decoded as one batch with that node's generator seed, in fp32.
"""

import io
import json
import re
import sys
from contextlib import redirect_stderr
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from helpers import ASSETS, TINY, tiny_model, torchrun

from lima_core.checkpoint.hf import load_pretrained, save_pretrained
from lima_core.config import Config
from lima_core.data.encode import prompt_ids
from lima_core.data.formats import read_conversations
from lima_core.data.tokenizer import Tokenizer
from lima_core.inference.decode import decode_batch
from lima_core.model.dispatch import mix_seed
from lima_core.model.llama import Llama
from lima_core.model.shapes import PRESETS, ModelConfig
from lima_core.parallel.decode_layout import (
    choose_dev_layout,
    copy_bytes,
    load_tensor_parallel,
    local_config,
)
from lima_core.parallel.parallelize import llama_units, unit_numels
from lima_core.parallel.topology import Collectives, Topology

NODES, NODE_SIZE, EPOCHS, MAX_NEW = 2, 2, 3, 16
WINDOW = (1, 2)  # LIMA's epochs 5-10 of 15, scaled to 3: the epochs with dev generations
# seeded: LIMA's sampling settings. greedy: a strong repetition penalty, so the barely trained
# model's argmax keeps moving to new tokens (with LIMA's 1.2 it repeats one token).
PENALTY = 2.0
RUNS = {"seeded": [], "greedy": ["--temperature", "0", "--repetition-penalty", str(PENALTY)]}
NODE_LINE = ("lima-core: epoch {}: dev generation on the node-local layout (tensor-parallel over 2 ranks a node, "
             "2 nodes)")


# ---- the worker: every rank of the launch runs this -------------------------------------------


def worker(spec_path: str):
    """Both trainer runs, each with its own byte counter, then the export decoded on each node's
    tensor-parallel copy; rank 0 writes the results beside the spec."""
    from lima_core.cli import load_config
    from lima_core.parallel.distributed import destroy_distributed, init_distributed
    from lima_core.parallel.topology import ByteCounter
    from lima_core.train.loop import fine_tune

    spec = json.loads(Path(spec_path).read_text())
    base = init_distributed("cpu", node_size=NODE_SIZE)
    results = {"logs": {}}
    for name, args in spec["runs"].items():
        dist = replace(base, comm=Collectives(base.topology, ByteCounter()))
        said = io.StringIO()
        with redirect_stderr(said):
            status = fine_tune(load_config(args), dist)
        assert status == 0, said.getvalue()[-3000:]
        results["logs"][name] = re.findall(r"lima-core: epoch \d+: dev generation[^\n\r]*", said.getvalue())
    results["tensor_parallel"] = decode_on_copies(spec["export"], spec["dev"], base.comm)
    if base.rank == 0:
        Path(spec_path).with_name("results.json").write_text(json.dumps(results))
    destroy_distributed(base)


def decode_on_copies(export: str, dev: str, comm: Collectives) -> list[dict]:
    """Every dev prompt decoded greedily as one batch by each node on its load_tensor_parallel
    copy: every rank's tokens and the size of its copy."""
    model = load_tensor_parallel(export, comm)
    tokenizer = Tokenizer(export)
    prompts = [prompt_ids(tokenizer, c.prompt) for c in read_conversations(dev)]
    rows = decode_batch(model, prompts, max_new_tokens=MAX_NEW, temperature=0, repetition_penalty=PENALTY,
                        stop_ids={tokenizer.eot_id, tokenizer.eos_id}, comm=comm, level="node")
    mine = {"tokens": [r.tokens for r in rows], "params": sum(p.numel() for p in model.parameters())}
    every = [None] * comm.topology.world
    torch.distributed.all_gather_object(every, mine)
    return every


# ---- the launch, once for the module -------------------------------------------------------------


def tied_checkpoint(folder: Path) -> Path:
    """The tiny test model with a tied head and an ffn_dim (75) that splits 37 + 38 over 2 ranks."""
    tokenizer = Tokenizer(ASSETS / "tokenizer.model")
    model = tiny_model(seed=3, vocab_size=tokenizer.base_vocab_size, tie_embeddings=True, ffn_dim=75,
                       max_seq_len=2048, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    save_pretrained(model, folder)
    return folder


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("decode_layout")
    for name, lines in (("train.jsonl", 8), ("dev.jsonl", 5)):  # 2 steps an epoch; dev shares of 3 and 2
        (root / name).write_text("".join(f"{line}\n" for line in (ASSETS / name).read_text().splitlines()[:lines]))
    checkpoint = tied_checkpoint(root / "tied")
    common = ["--data", str(root / "train.jsonl"), "--dev-data", str(root / "dev.jsonl"), "--out-dir", str(root),
              "--epochs", str(EPOCHS), "--batch-size", "4", "--lr", "1e-3", "--max-new-tokens", str(MAX_NEW),
              "--plot", "false", "--node-size", str(NODE_SIZE), "--dev-decode", "node", "--count-bytes", "true"]
    models = {"seeded": [], "greedy": ["--model", str(checkpoint), "--tokenizer", str(ASSETS / "tokenizer.model")]}
    runs = {name: [*common, "--name", name, *models[name], *extra] for name, extra in RUNS.items()}
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "export": str(root / "greedy" / "epoch-2"),
                                "dev": str(root / "dev.jsonl")}))
    torchrun(NODES * NODE_SIZE, str(Path(__file__)), str(spec), timeout=900)
    return {"root": root, **json.loads((root / "results.json").read_text())}


@dataclass
class NodeShare:
    """What node n decoded: its rows, its longest prompt, and its decode steps (its longest answer)."""

    rows: int
    longest: int
    steps: int


def one_process_answers(run: Path, epoch: int) -> tuple[list[str], list[NodeShare]]:
    """Each dev answer as one process decodes the epoch's export: node n's share (conversations
    n, n + NODES, ...) as one batch with generator mix_seed(seed, epoch, n), in fp32."""
    config = json.loads((run / "config.json").read_text())
    seed, sampling = config["train"]["seed"], config["sampling"]
    model, tokenizer = load_pretrained(run / f"epoch-{epoch}"), Tokenizer(run / f"epoch-{epoch}")
    dev = read_conversations(run.parent / "dev.jsonl")
    answers, shares = [None] * len(dev), []
    for node in range(NODES):
        prompts = [prompt_ids(tokenizer, c.prompt) for c in dev[node::NODES]]
        rows = decode_batch(model, prompts, max_new_tokens=sampling["max_new_tokens"],
                            temperature=sampling["temperature"], top_p=sampling["top_p"],
                            repetition_penalty=sampling["repetition_penalty"],
                            stop_ids={tokenizer.eot_id, tokenizer.eos_id},
                            generator=torch.Generator().manual_seed(mix_seed(seed, epoch, node)))
        for j, row in enumerate(rows):
            answers[node + j * NODES] = tokenizer.decode(row.tokens)
        shares.append(NodeShare(len(rows), max(map(len, prompts)), max(len(row.tokens) for row in rows)))
    return answers, shares


# ---- the tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_node_local_dev_answers_equal_one_process(launch, run):
    """Per prompt and epoch, the trainer's answer against one process's, equal or not (printed)."""
    table, differ = [], []
    for epoch in WINDOW:
        generated = json.loads((launch["root"] / run / f"generations-epoch-{epoch}.json").read_text())
        reference, _ = one_process_answers(launch["root"] / run, epoch)
        for i, (g, ref) in enumerate(zip(generated, reference, strict=True)):
            equal = g["answer"] == ref
            table.append(f"{run:7} epoch {epoch} prompt {i} (node {i % NODES}): {'equal' if equal else 'DIFFERS'}")
            if not equal:
                differ.append((epoch, i, g["answer"], ref))
    print("\n" + "\n".join(table))
    assert not differ, differ


@pytest.mark.parametrize("run", RUNS)
def test_the_run_says_which_layout_generated_the_answers(launch, run):
    assert launch["logs"][run] == [NODE_LINE.format(epoch) for epoch in WINDOW]


@pytest.mark.parametrize("run", RUNS)
def test_no_collective_leaves_the_node_while_decoding(launch, run):
    """Phase dev_generation, counted: the copy's one gather of each unit over the world (its
    padded flat buffer, fp32), then only all-reduces inside the node: the longest prompt (int64),
    each step's "anyone decoding?" (int32), and per Block and forward the outputs of wo and
    w_down (b x t x dim, fp32: t the longest prompt in prefill, then 1)."""
    counts = json.loads((launch["root"] / run / "bytes.json").read_text())["ranks"]
    cfg = ModelConfig(**json.loads((launch["root"] / run / "config.json").read_text())["model"])
    with torch.device("meta"):
        numels = unit_numels(llama_units(Llama(cfg)))
    world = NODES * NODE_SIZE
    gathered = sum(-(-n // world) * world for n in numels) * 4  # FSDP pads each unit to a multiple of the world
    shares = {epoch: one_process_answers(launch["root"] / run, epoch)[1] for epoch in WINDOW}
    for rank, count in enumerate(counts):
        decoding = {key.removeprefix("dev_generation/"): n for key, n in count.items()
                    if key.startswith("dev_generation/")}
        assert set(decoding) == {"all_gather/world", "all_reduce/node"}, (rank, decoding)
        gather = decoding["all_gather/world"]
        assert (gather["calls"], gather["buffer_bytes"]) == (len(numels) * len(WINDOW), gathered * len(WINDOW))
        node = [shares[epoch][rank // NODE_SIZE] for epoch in WINDOW]
        calls = sum(1 + s.steps * (1 + 2 * cfg.n_layers) for s in node)
        tokens = sum(s.rows * (s.longest + s.steps - 1) for s in node)  # forwarded: the prompts, then a token a step
        buffer = sum(8 + 4 * s.steps for s in node) + 2 * cfg.n_layers * tokens * cfg.dim * 4
        reduce = decoding["all_reduce/node"]
        assert (reduce["calls"], reduce["buffer_bytes"]) == (calls, buffer), (rank, reduce)


def test_load_tensor_parallel_on_two_ranks_equals_one_process(launch):
    """Each node's copy read from the tied export (each rank its slices) gives one process's
    greedy tokens; each rank holds its share of the Blocks and the whole embedding."""
    export = launch["root"] / "greedy" / "epoch-2"
    model, tokenizer = load_pretrained(export), Tokenizer(export)
    prompts = [prompt_ids(tokenizer, c.prompt) for c in read_conversations(launch["root"] / "dev.jsonl")]
    expected = [r.tokens for r in decode_batch(model, prompts, max_new_tokens=MAX_NEW, temperature=0,
                                               repetition_penalty=PENALTY,
                                               stop_ids={tokenizer.eot_id, tokenizer.eos_id})]
    assert len(launch["tensor_parallel"]) == NODES * NODE_SIZE
    for rank, got in enumerate(launch["tensor_parallel"]):
        assert got["tokens"] == expected, rank
        assert got["params"] == local_config(model.cfg, NODE_SIZE, rank % NODE_SIZE).num_params()
    assert max(got["params"] for got in launch["tensor_parallel"]) * 4 == copy_bytes(model.cfg, NODE_SIZE,
                                                                                     torch.float32)


# ---- the choice, in this process ------------------------------------------------------------------


def settings(dev_decode: str, **sampling) -> Config:
    return Config.model_validate({"parallel": {"dev_decode": dev_decode}, "sampling": sampling})


TWO_BY_TWO = Topology(0, 4, 2)


def test_heads_that_do_not_split_over_a_node_fall_back_to_gather_and_say_why():
    odd = ModelConfig(**{**TINY, "n_heads": 3, "n_kv_heads": 3})
    for setting in ("auto", "node"):
        layout = choose_dev_layout(settings(setting), odd, TWO_BY_TWO, [10, 20], free_bytes=None)
        assert layout.name == "gather"
        assert layout.describe() == ("dev generation on the sharded model, every unit gathered each decode step "
                                     "(the node-local layout needs the 3 query and 3 key/value heads to split over "
                                     "the 2 ranks of a node)")
    grouped = ModelConfig(**TINY)  # 6 query and 2 key/value heads: neither splits over 4 ranks
    layout = choose_dev_layout(settings("auto"), grouped, Topology(0, 8, 4), [10], free_bytes=None)
    assert layout.name == "gather" and "the 6 query and 2 key/value heads" in layout.reason


def test_auto_takes_the_node_layout_where_the_copy_and_its_cache_fit():
    cfg = ModelConfig(**PRESETS["llama-65b"])
    lengths = [300] * 50  # 50 dev prompts over 8 nodes: 7 a node at most
    topology = Topology(0, 64, 8)
    asked = settings("auto", max_new_tokens=2048)
    need = copy_bytes(cfg, 8, torch.float32) + 2 * cfg.n_layers * 7 * 2048 * (64 // 8) * cfg.head_dim * 4
    fits = choose_dev_layout(asked, cfg, topology, lengths, free_bytes=need)
    assert fits.name == "node" and fits.reason.startswith("tensor-parallel over 8 ranks a node, 8 nodes; the copy")
    short = choose_dev_layout(asked, cfg, topology, lengths, free_bytes=need - 1)
    assert short.name == "gather" and "do not fit" in short.reason
    assert choose_dev_layout(settings("node"), cfg, topology, lengths, free_bytes=need - 1).name == "node"  # as asked
    gather = choose_dev_layout(settings("gather"), cfg, topology, lengths, free_bytes=None)
    assert (gather.name, gather.reason) == ("gather", "--dev-decode gather")
    one = choose_dev_layout(settings("auto"), cfg, Topology(0, 1, 1), lengths, free_bytes=None)
    assert (one.name, one.reason) == ("gather", "one process: the model is whole, nothing to gather")


def test_a_node_of_one_rank_reads_the_whole_model(tmp_path):
    """One rank a node: the copy is the checkpoint's model itself, tensor for tensor."""
    folder = tied_checkpoint(tmp_path / "tied")
    copy, whole = load_tensor_parallel(folder, Collectives(Topology(0, 1, 1))), load_pretrained(folder)
    assert copy.cfg == whole.cfg
    for (name, value), (_, expected) in zip(copy.state_dict().items(), whole.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name


if __name__ == "__main__":
    worker(sys.argv[1])
