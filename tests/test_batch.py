"""Shard selection for array jobs."""

from __future__ import annotations

import pytest

from uadct.batch import parse_shard, resolve_shard, select_shard, shard_from_environment
from uadct.errors import UadctError


def test_shards_are_disjoint_and_cover_everything():
    items = [f"sub-{i:02d}" for i in range(23)]
    shards = [select_shard(items[::-1], (i, 4)) for i in range(4)]
    assert sorted(sum(shards, [])) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert select_shard(items, None) == items


@pytest.mark.parametrize("text", ["3", "a/b", "4/4", "-1/3", "1/0"])
def test_bad_shard_text_is_refused(text):
    with pytest.raises(UadctError, match="shard"):
        parse_shard(text)


def test_slurm_variables():
    assert shard_from_environment({}) is None
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "5"}) == (2, 5)
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "1"}) == (4, 5)
    with pytest.raises(UadctError):
        shard_from_environment({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "5"})
    assert resolve_shard("1/3") == (1, 3)


def test_scans_and_their_prepared_folders_fall_in_the_same_shard():
    from pathlib import Path

    from uadct.io import strip_nifti_suffix

    scans = [Path(f"raw/{n}.nii.gz") for n in ("a", "a-b", "a_c", "b", "a.1")]
    folders = [Path(f"prep/{n}") for n in ("a", "a-b", "a_c", "b", "a.1")]
    for index in range(3):
        chosen_scans = select_shard(scans, (index, 3), key=lambda p: strip_nifti_suffix(p))
        chosen_folders = select_shard(folders, (index, 3), key=lambda p: p.name)
        assert [strip_nifti_suffix(p) for p in chosen_scans] == [p.name for p in chosen_folders]
