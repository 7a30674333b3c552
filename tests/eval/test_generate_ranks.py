"""`torchrun --nproc_per_node 2 -m lima_core.eval generate --checkpoint`: two ranks hold one
tensor-parallel copy (each reading only its slices of the files) and decode every batch in
lockstep; rank 0 alone writes. The responses are one process's, line for line, with LIMA's
seeded sampling and greedy."""

import json
import subprocess
import sys

import pytest
from helpers import ASSETS, torchrun

from lima_core.eval.generate import read_responses


@pytest.mark.parametrize("temperature", ["0.7", "0"])
def test_two_ranks_write_what_one_process_writes(tmp_path, checkpoint, temperature):
    args = ["-m", "lima_core.eval", "generate", "--prompts", str(ASSETS / "dev.jsonl"), "--checkpoint",
            str(checkpoint), "--max-new-tokens", "24", "--temperature", temperature, "--device", "cpu",
            "--batch-size", "3"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.jsonl")], capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *args, "--out", str(tmp_path / "two.jsonl"))
    assert two.stdout.count("responses written") == 1  # rank 0 reports; rank 1 decodes and says nothing
    ones, twos = read_responses(tmp_path / "one.jsonl"), read_responses(tmp_path / "two.jsonl")
    assert len(ones) == 8 and [json.dumps(r) for r in twos] == [json.dumps(r) for r in ones]
