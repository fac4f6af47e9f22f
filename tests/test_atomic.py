from __future__ import annotations

import os

import pytest

from revgan_med.io.atomic import atomic_path, atomic_write_text, remove_stale_temps


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_output_gets_the_permissions_of_a_plain_write(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert (tmp_path / "a.txt").read_text() == "x"
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_a_new_write_removes_only_the_temporaries_a_killed_write_of_the_same_file_left(tmp_path):
    stale = tmp_path / ".x.nii.gz.ab12cd34.tmp.nii.gz"  # mkstemp's name for a write of x.nii.gz
    other = tmp_path / ".y.nii.gz.ab12cd34.tmp.nii.gz"  # another file's: not ours to touch here
    user = tmp_path / ".x.nii.gz.notes"  # not a temporary at all
    for path in (stale, other, user):
        path.write_text("leftover")
    atomic_write_text(tmp_path / "x.nii.gz", "new")
    assert not stale.exists() and other.exists() and user.exists()
    assert remove_stale_temps(tmp_path) == [other] and user.exists()
