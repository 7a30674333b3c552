"""Atomic writes: a finished write appears whole under its name, a failed one leaves nothing,
and what a killed writer left is recognisable and removed."""

import json

import pytest

from lima_core.checkpoint.atomic import TEMP_PREFIX, atomic_dir, remove_stale_temps, write_json


def test_a_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "epoch-1"
    for version in (1, 2):
        with atomic_dir(target) as tmp:
            assert not target.exists() or json.loads((target / "v.json").read_text()) == {"v": version - 1}
            write_json(tmp / "v.json", {"v": version})
    assert json.loads((target / "v.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1"]


def test_a_failed_write_leaves_the_previous_folder_and_no_temporary(tmp_path):
    target = tmp_path / "epoch-1"
    with atomic_dir(target) as tmp:
        write_json(tmp / "v.json", {"v": 1})
    with pytest.raises(OSError, match="injected"):
        with atomic_dir(target) as tmp:
            write_json(tmp / "v.json", {"v": 2})
            raise OSError("disk full (injected)")
    assert json.loads((target / "v.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1"]


def test_stale_temporaries_are_found_and_removed(tmp_path):
    (tmp_path / f"{TEMP_PREFIX}epoch-3").mkdir()
    (tmp_path / "state" / f"{TEMP_PREFIX}step-4").mkdir(parents=True)
    (tmp_path / f"{TEMP_PREFIX}summary.json").write_text("{")
    (tmp_path / "epoch-2").mkdir()
    removed = remove_stale_temps(tmp_path)
    assert len(removed) == 3
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["epoch-2", "state"]
