"""The planner's byte formulas against what a run counts: the trainer on 4 gloo ranks emulated
as 2 nodes x 2 (--node-size 2), with --count-bytes, once with flat sharding and the gather
decode layout in fp32, once with two-level sharding and the node-local decode layout in bf16
(bf16 gathers, copy and exports, fp32 gradient reductions: every dtype factor). Every rank's
count per (phase, collective, level) in bytes.json (calls, buffer bytes, bytes sent) must equal
lima_core.parallel.planning.traffic's prediction exactly: the buffers are padded integers, and (G - 1) / G
is a power-of-two fraction here, exact in floats.

What a prediction takes from the run rather than from a formula, since it depends on the data:
the micro-batches of each step and the dev-loss rows (how the examples pack: the trainer's own
packer over the run's epoch order), the exports and the evaluated epochs (the folders and files
the run wrote), and the decode steps (the longest answer of a batch, in tokens, its stop token
included: greedy answers decoded again in one process from the epoch's export, which holds the
weights that generated them, in the batches the run decoded: a rank's prompts on the gather
layout, a node's on the node layout) and each batch's longest prompt.
"""

import json
import math

import pytest
import torch
from helpers import ASSETS, torchrun

from lima_core.checkpoint.hf import load_pretrained
from lima_core.data.encode import encode_conversation, prompt_ids
from lima_core.data.formats import read_conversations
from lima_core.data.packing import epoch_batches, pack
from lima_core.data.tokenizer import BUNDLED_TOKENIZER, Tokenizer
from lima_core.inference.decode import decode_batch
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.planning.cluster import Cluster
from lima_core.parallel.planning.memory import BYTES, fsdp_units
from lima_core.parallel.planning.traffic import Traffic, dev_loss, export, gather_decode, node_decode, train_step

WORLD, NODE_SIZE = 4, 2
MAX_LEN, BATCH, EPOCHS, SEED, NEW_TOKENS = 300, 8, 2, 0, 4
# Each training example (200-265 tokens) fills a row of 300 alone: steps of 8 examples run 2
# micro-batches a rank, the epoch's last step of 2 examples one. Three dev prompts: rank 3 (gather)
# decodes none; node 0 decodes two, node 1 one.
TRAIN_EXAMPLES, DEV_CONVERSATIONS = 10, 3
RUNS = {"flat-gather": ("flat", "gather", "fp32"), "two-level-node": ("two-level", "node", "bf16")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each layout's run folder, trained once for the whole module."""
    root = tmp_path_factory.mktemp("plan-bytes")
    data, dev = root / "train.jsonl", root / "dev.jsonl"
    data.write_text("".join(line + "\n" for line in (ASSETS / "train.jsonl").read_text().splitlines()[:TRAIN_EXAMPLES]))
    dev.write_text("".join(line + "\n" for line in (ASSETS / "dev.jsonl").read_text().splitlines()[:DEV_CONVERSATIONS]))
    folders = {}
    for name, (sharding, dev_decode, dtype) in RUNS.items():
        torchrun(WORLD, "-m", "lima_core.train", "--data", str(data), "--dev-data", str(dev),
                 "--out-dir", str(root / "runs"), "--name", name, "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
                 "--max-len", str(MAX_LEN), "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0",
                 "--seed", str(SEED), "--dtype", dtype, "--plot", "false", "--node-size", str(NODE_SIZE),
                 "--sharding", sharding, "--dev-decode", dev_decode, "--count-bytes", "true", timeout=600)
        folders[name] = (root / "runs" / name, data, dev)
    return folders


def predicted(folder, data, dev, sharding: str, dev_decode: str, dtype: str) -> list[dict]:
    """Each rank's counts as the planner's formulas give them, for this run's data and outputs."""
    tokenizer = Tokenizer(BUNDLED_TOKENIZER)
    cfg = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                eos_id=tokenizer.eos_id)
    units, cluster, p = fsdp_units(cfg), Cluster(WORLD, NODE_SIZE), BYTES[dtype]
    examples = [encode_conversation(tokenizer, c, MAX_LEN) for c in read_conversations(data)]
    conversations = read_conversations(dev)
    dev_rows = len(pack([encode_conversation(tokenizer, c, MAX_LEN) for c in conversations], MAX_LEN))
    common = Traffic(cluster)
    for epoch in range(1, EPOCHS + 1):
        for batch in epoch_batches(examples, BATCH, epoch, SEED):
            rows = math.ceil(len(pack(batch, MAX_LEN)) / WORLD)
            common += train_step(units, cluster, micro_batches=rows, p=p, g=4, sharding=sharding)
        common += dev_loss(units, cluster, rows=dev_rows, p=p)
    common += export(units, cluster, e=p) * len(list(folder.glob("epoch-*")))
    evaluated = sorted(int(f.stem.split("-")[-1]) for f in folder.glob("generations-epoch-*.json"))
    assert evaluated, "the run generated no dev answers"
    ranks = []
    for rank in range(WORLD):
        generation = Traffic(cluster)
        for epoch in evaluated:
            generation += generation_traffic(folder / f"epoch-{epoch}", tokenizer, conversations, cfg, units,
                                             cluster, rank, dev_decode, p)
        ranks.append((common + generation).as_counts())
    return ranks


def generation_traffic(export_folder, tokenizer, conversations, cfg, units, cluster, rank, dev_decode, p) -> Traffic:
    """One evaluated epoch's dev generation on `rank`: the decode steps from the answers decoded
    again, greedily, in the batches the run decoded."""
    model = load_pretrained(export_folder, dtype={4: torch.float32, 2: torch.bfloat16}[p])
    prompts = [prompt_ids(tokenizer, c.prompt) for c in conversations]
    share = cluster.gpus if dev_decode == "gather" else cluster.nodes
    batches = [prompts[i::share] for i in range(share)]
    steps = [longest_answer(model, tokenizer, batch) for batch in batches]
    if dev_decode == "gather":
        return gather_decode(units, cluster, steps=max(steps), p=p)  # every rank steps until every rank is done
    node = rank // cluster.node_size
    mine = batches[node] or [[0]]  # a node without prompts decodes one idle row of one token
    return node_decode(units, cfg, cluster, rows=len(mine), prompt_tokens=max(map(len, mine)), steps=steps[node],
                       p=p)


def longest_answer(model, tokenizer, batch: list[list[int]]) -> int:
    """Decode steps of a batch: its longest answer in tokens (1 for a rank without prompts)."""
    if not batch:
        return 1
    rows = decode_batch(model, batch, max_new_tokens=NEW_TOKENS, temperature=0,
                        stop_ids={tokenizer.eot_id, tokenizer.eos_id})
    return max(len(row.tokens) for row in rows)


@pytest.mark.parametrize("name", list(RUNS))
def test_counted_bytes_equal_the_planner_formulas(runs, name):
    folder, data, dev = runs[name]
    counted = json.loads((folder / "bytes.json").read_text())
    assert (counted["world"], counted["node_size"]) == (WORLD, NODE_SIZE)
    expected = predicted(folder, data, dev, *RUNS[name])
    print(f"\n{name}: {'rank':>4} {'phase/collective/level':<36} {'counted calls, buffer, sent':>36} | predicted")
    for rank, (theirs, ours) in enumerate(zip(counted["ranks"], expected)):
        for key in sorted(set(theirs) | set(ours)):
            c, e = theirs.get(key, {}), ours.get(key, {})
            row = [(n.get("calls"), n.get("buffer_bytes"), n.get("sent_bytes")) for n in (c, e)]
            print(f"{'':>{len(name) + 1}} {rank:>4} {key:<36} {str(row[0]):>36} | {row[1]}"
                  f"{'' if row[0] == row[1] else '   <- differs'}")
    for rank, (theirs, ours) in enumerate(zip(counted["ranks"], expected)):
        assert theirs == ours, f"rank {rank}"
