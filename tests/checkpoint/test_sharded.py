"""The one sharded-folder writer: the in-order packer against a plain loop, the files and index
against what transformers' own save_pretrained writes, and the collective folder appearing whole
or not at all (one process, and two gloo ranks with one of them failing inside it)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, TORCHRUN, make_hf_model, torchrun

from lima_core.checkpoint.atomic import TEMP_PREFIX, remove_stale_temps
from lima_core.checkpoint.sharded import INDEX, collective_dir, nbytes, shard_files, write_shards

WORKER = str(Path(__file__).with_name("collective_worker.py"))


def test_shard_files_are_named_as_transformers_names_them():
    assert shard_files([5, 5], 10) == [("model.safetensors", [0, 1])]
    # 5 + 6 overflows, 30 is over the limit on its own, 30 + 4 overflows, 4 + 4 fits
    assert shard_files([5, 6, 30, 4, 4], 10) == [("model-00001-of-00004.safetensors", [0]),
                                                 ("model-00002-of-00004.safetensors", [1]),
                                                 ("model-00003-of-00004.safetensors", [2]),
                                                 ("model-00004-of-00004.safetensors", [3, 4])]


@pytest.mark.parametrize("files", ["several", "one"])
def test_files_and_index_equal_transformers_save_pretrained(tmp_path, files):
    """The same tensors in the same order with the same limit (no tensor over it, where
    huggingface_hub moves an oversize tensor ahead of the open file): every safetensors file
    byte for byte, and the index's weight map and total size (transformers also records
    total_parameters, which lima-core's index never held)."""
    model = make_hf_model("gqa-llama3-rope")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    limit = 2 * max(nbytes(t) for t in tensors.values()) if files == "several" else 2**30
    model.save_pretrained(tmp_path / "transformers", max_shard_size=limit)
    (tmp_path / "ours").mkdir()
    write_shards(tensors, tmp_path / "ours", limit)

    names = sorted(p.name for p in (tmp_path / "transformers").glob("*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    assert (len(names) > 1) == (files == "several")
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "transformers" / name).read_bytes(), name
    assert (tmp_path / "ours" / INDEX).exists() == (tmp_path / "transformers" / INDEX).exists() == (len(names) > 1)
    if len(names) > 1:
        theirs, ours = (json.loads((tmp_path / side / INDEX).read_text()) for side in ("transformers", "ours"))
        assert ours["weight_map"] == theirs["weight_map"]
        assert ours["metadata"] == {"total_size": theirs["metadata"]["total_size"]}


def test_a_crash_inside_the_collective_folder_leaves_the_final_path_as_it_was(tmp_path):
    final = tmp_path / "step-3"
    with pytest.raises(OSError, match="injected"):
        with collective_dir(final, 0, None) as tmp:
            (tmp / "rank-0.safetensors").write_bytes(b"half")
            raise OSError("disk full (injected)")
    assert not final.exists()
    assert remove_stale_temps(tmp_path) == [tmp_path / f"{TEMP_PREFIX}step-3"]  # the next run's cleanup finds it

    final.mkdir()
    (final / "old.txt").write_text("the previous folder\n")
    with pytest.raises(KeyboardInterrupt):
        with collective_dir(final, 0, None) as tmp:
            (tmp / "new.txt").write_text("half\n")
            raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]

    with collective_dir(final, 0, None) as tmp:  # a leftover temp is emptied first, an older folder replaced
        (tmp / "new.txt").write_text("whole\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_two_ranks_write_one_folder_and_a_rank_failing_inside_leaves_none(tmp_path):
    torchrun(2, WORKER, str(tmp_path / "whole"), "write")  # the worker checks every rank sees both files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", WORKER, str(tmp_path / "crashed"),
                             "crash"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "injected" in result.stderr, result.stderr[-4000:]
    assert not (tmp_path / "crashed").exists()
    leftover = tmp_path / f"{TEMP_PREFIX}crashed"
    assert (leftover / "rank-1.txt").is_file()  # left for remove_stale_temps, not deleted under another rank
