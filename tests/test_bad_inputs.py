"""Bad and odd inputs across preprocess, train, infer and evaluate, as a table.

Every bad case must give its exit code and one line holding the listed words, print no traceback,
leave every input and every pre-existing output byte-identical; odd but legitimate inputs must work.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _training_data import AFFINE, tiny_config, write_kernel_datalist

from revgan_med.checkpoints import load_checkpoint, save_checkpoint
from revgan_med.cli import main
from revgan_med.config import save_config
from revgan_med.data.phantom import make_phantom
from revgan_med.io import load_volume, save_dicom_series, save_volume
from revgan_med.training.loop import train

SHAPE = (16, 16, 16)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _scan(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return make_phantom(shape, (1.5, 1.5, 2.0), seed=seed)[0]


def _nifti_claiming(path: Path, shape: tuple[int, int, int]) -> None:
    """A small .nii.gz whose header claims `shape` float32 voxels (1.5 GB for 720³)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + bytes(4096)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Inputs (scans, pairs CSVs, datalists, checkpoints) and pre-existing outputs, under one root."""
    root = tmp_path_factory.mktemp("world")
    w = {"root": root}
    inputs = root / "inputs"
    save_volume(_scan(1), AFFINE, inputs / "ct" / "good.nii.gz")
    nan = np.full(SHAPE, np.nan, np.float32)
    save_volume(nan, AFFINE, inputs / "nan" / "all_nan.nii.gz")
    inf = _scan(2)
    inf[4:7, 4:7, 8] = np.inf  # 9 voxels
    save_volume(inf, AFFINE, inputs / "inf" / "good.nii.gz")
    save_volume(_scan(3), AFFINE, inputs / "inf" / "other.nii.gz")
    huge = _scan(3).astype(np.float64)
    huge[0, 0, 0] = 1e300  # beyond float32: the cast to float32 overflows (a numpy RuntimeWarning)
    (inputs / "float64").mkdir()
    nib.save(nib.Nifti1Image(huge, AFFINE), inputs / "float64" / "huge.nii.gz")
    (inputs / "huge").mkdir()
    _nifti_claiming(inputs / "huge" / "claims.nii.gz", (720, 720, 720))
    save_volume(_scan(4)[:, :, 0], AFFINE, inputs / "flat.nii.gz")  # a 2D image
    (inputs / "empty").mkdir()
    pairs = inputs / "pairs"
    save_volume(_scan(5), AFFINE, pairs / "source.nii.gz")
    save_volume(_scan(5) + 10, AFFINE, pairs / "target.nii.gz")
    for name, case in (("dotdot", "../x"), ("absolute", "/tmp/x"), ("nested", "a/b"), ("odd", "Müller ü 1")):
        (pairs / f"{name}.csv").write_text(f"case,source,target\n{case},source.nii.gz,target.nii.gz\n")
    w["datalist"] = write_kernel_datalist(inputs / "kernel")
    nan_data = inputs / "kernel_nan"
    shutil.copytree(inputs / "kernel", nan_data)
    for case in nan_data.glob("case*"):
        image, affine = load_volume(case / "smooth.nii.gz")
        image[8:20, 8:20, 8:20] = np.nan
        save_volume(image, affine, case / "smooth.nii.gz")
    w["nan_datalist"] = nan_data / "datalist.json"
    w["other_task"] = inputs / "other_task.yaml"
    save_config(tiny_config(w["datalist"], "task=ct-sr", "data.factors=[1,1,2]"), w["other_task"])
    outputs = root / "outputs"
    run = outputs / "run"
    train(tiny_config(w["datalist"], "train.steps=2", "train.decay_start=1"), run)
    w["run"], w["ckpt"] = run, run / "checkpoints" / "last.pt"
    payload = load_checkpoint(w["ckpt"])
    save_checkpoint(inputs / "no_keys.pt", {k: v for k, v in payload.items() if k not in ("intensity",)})
    wider = {**payload, "config": {**payload["config"], "model": {**payload["config"]["model"], "width": 8}}}
    save_checkpoint(inputs / "width.pt", wider)
    torch.save({"obj": Path("x")}, inputs / "pickle.pt")  # a pickle with a Python object
    (outputs / "dicom_out").mkdir()
    (outputs / "dicom_out" / "keep.txt").write_text("an earlier result")
    (outputs / "blocker").write_text("a file, not a folder")
    evaluation = inputs / "eval"
    for name, seed in (("a", 6), ("b", 7)):
        save_volume(_scan(seed), AFFINE, evaluation / "ref" / f"{name}.nii.gz")
        save_volume(_scan(seed) + 5, AFFINE, evaluation / "pred" / f"{name}.nii.gz")
    bad = _scan(7) + 5
    bad[0, 0, 0] = np.nan
    save_volume(bad, AFFINE, evaluation / "pred" / "b.nii.gz")
    w["inputs"], w["outputs"] = inputs, outputs
    return w


@dataclass(frozen=True)
class Bad:
    id: str
    argv: Callable[[dict, Path], list[str]]
    code: int
    words: tuple[str, ...]
    absent: tuple[str, ...] = ()
    check: Callable[[dict, Path], None] | None = None


def _prep(sub: str, *extra: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, t: ["preprocess", str(w["inputs"] / sub), str(t / "prep"), "--task", "ct-sr", *extra]


def _pairs(csv: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, t: ["preprocess", str(w["inputs"] / "pairs"), str(t / "prep"), "--task", "ct-kernel",
                         "--pairs", str(w["inputs"] / "pairs" / csv)]  # fmt: skip


def _infer(ckpt: str, source: str, output: str = "{t}/out.nii.gz", *extra: str) -> Callable:
    def argv(w: dict, t: Path) -> list[str]:
        checkpoint = w["ckpt"] if ckpt == "run" else w["inputs"] / ckpt
        out = output.format(t=t, o=w["outputs"])
        return ["infer", "--checkpoint", str(checkpoint), "--input", str(w["inputs"] / source),
                "--output", out, "--device", "cpu", *extra]  # fmt: skip

    return argv


def _train(*extra: str, datalist: str = "datalist") -> Callable:
    def argv(w: dict, t: Path) -> list[str]:
        config = t / "config.yaml"
        save_config(tiny_config(w[datalist], "train.steps=2", "train.decay_start=1"), config)
        return ["train", "--config", str(config), "--output", str(t / "run"), *extra]

    return argv


def _evaluate(w: dict, t: Path) -> list[str]:
    folder = w["inputs"] / "eval"
    return ["evaluate", "--prediction", str(folder / "pred"), "--reference", str(folder / "ref"),
            "--window", "nlst", "--output", str(t / "metrics.csv")]  # fmt: skip


def _nothing_written(w: dict, t: Path) -> None:
    assert not (t / "prep").exists() and not (t / "run").exists() and not (t / "out.nii.gz").exists()


def _failed_row(case: str, *words: str) -> Callable[[dict, Path], None]:
    def check(w: dict, t: Path) -> None:
        rows = (t / "prep" / "report.csv").read_text().splitlines()
        row = next(r for r in rows if r.startswith(case + ","))
        assert ",failed," in row and all(word in row for word in words)
        assert not (t / "prep" / case / "target.nii.gz").exists()

    return check


def _mean_over_valid(w: dict, t: Path) -> None:
    rows = (t / "metrics.csv").read_text().splitlines()
    a = next(r for r in rows if r.startswith("a,prediction")).split(",")
    mean = next(r for r in rows if r.startswith("mean,prediction")).split(",")
    assert a[2:] == mean[2:]  # the mean of one valid case is that case


CASES = [
    Bad("pairs-case-dotdot", _pairs("dotdot.csv"), 2, ("dotdot.csv", "'../x'", "one folder name"),
        check=_nothing_written),
    Bad("pairs-case-absolute", _pairs("absolute.csv"), 2, ("absolute.csv", "'/tmp/x'", "one folder name"),
        check=_nothing_written),
    Bad("pairs-case-nested", _pairs("nested.csv"), 2, ("'a/b'",), check=_nothing_written),
    Bad("preprocess-empty-folder", _prep("empty"), 2, ("empty", "no NIfTI file or DICOM series"),
        check=_nothing_written),
    Bad("preprocess-all-nan", _prep("nan"), 1, ("all_nan", "all voxels are NaN or infinite"),
        check=_failed_row("all_nan", "all voxels")),
    Bad("preprocess-inf-voxels", _prep("inf"), 1, ("good.nii.gz", "9 of 4096 voxels are NaN or infinite"),
        check=_failed_row("good", "9 of 4096")),
    Bad("preprocess-float64-overflow", _prep("float64"), 1, ("huge.nii.gz", "1 of 4096 voxels")),
    Bad("preprocess-header-claims-1.5GB", _prep("huge"), 1, ("claims.nii.gz", "header claims", "MB")),
    Bad("preprocess-bad-shard", _prep("ct", "--shard", "2/2"), 2, ("--shard", "0 <= i < n"),
        check=_nothing_written),
    Bad("preprocess-output-holds-input", lambda w, t: ["preprocess", str(w["inputs"] / "ct"),
        str(w["inputs"]), "--task", "ct-sr"], 2, ("must not be or contain the input folder",)),  # fmt: skip
    Bad("train-zero-factor", _train("--set", "data.factors=[2,2,0]"), 2,
        ("data.factors", "three positive integers"), check=_nothing_written),
    Bad("train-negative-steps", _train("--set", "train.steps=-5"), 2, ("train.steps", ">= 1"),
        check=_nothing_written),
    Bad("train-nan-data", _train(datalist="nan_datalist"), 1, ("step 1", "loss l1_xy is nan", "not finite"),
        check=_nothing_written),
    Bad("train-missing-datalist", _train("--set", "data.datalist=nowhere.json"), 1, ("nowhere.json",),
        check=_nothing_written),
    Bad("train-output-under-a-file", lambda w, t: ["train", "--config", str(w["other_task"]), "--output",
        str(w["outputs"] / "blocker" / "run")], 1, ("blocker", "is a file, not a folder")),  # fmt: skip
    Bad("train-resume-other-task", lambda w, t: ["train", "--config", str(w["other_task"]), "--output",
        str(w["run"]), "--resume"], 2, ("last.pt", "task 'ct-kernel'", "own config")),  # fmt: skip
    Bad("infer-checkpoint-missing-keys", _infer("no_keys.pt", "ct/good.nii.gz"), 1,
        ("no_keys.pt", "lacks intensity"), check=_nothing_written),
    Bad("infer-checkpoint-width-mismatch", _infer("width.pt", "ct/good.nii.gz"), 1,
        ("width.pt", "do not fit", "width 8", "size mismatch"), check=_nothing_written),
    Bad("infer-pickle-checkpoint", _infer("pickle.pt", "ct/good.nii.gz"), 1,
        ("pickle.pt", "not a readable checkpoint", "could run code"), absent=("weights_only",)),
    Bad("infer-output-under-a-file", _infer("run", "ct/good.nii.gz", "{o}/blocker/x.nii.gz"), 1,
        ("blocker", "is a file, not a folder")),
    Bad("infer-missing-input", _infer("run", "nowhere.nii.gz"), 1, ("nowhere.nii.gz", "no such file"),
        check=_nothing_written),
    Bad("infer-inf-voxels", _infer("run", "inf/good.nii.gz"), 1, ("good.nii.gz", "9 of 4096", "infinite"),
        check=_nothing_written),
    Bad("infer-2d-image", _infer("run", "flat.nii.gz"), 1, ("flat.nii.gz", "2D", "3D volume"),
        check=_nothing_written),
    Bad("infer-bad-shard", _infer("run", "ct", "{t}/out", "--shard", "3/2"), 2, ("--shard",)),
    Bad("infer-dicom-into-existing-folder", _infer("run", "ct/good.nii.gz", "{o}/dicom_out",
        "--output-format", "dicom"), 1, ("dicom_out", "already exists", "--output")),  # fmt: skip
    Bad("evaluate-nan-prediction", _evaluate, 1, ("FAILED b", "b.nii.gz", "1 of 4096"),
        check=_mean_over_valid),
    Bad("evaluate-bad-factors", lambda w, t: ["evaluate", "--prediction", "p.nii.gz", "--reference",
        "r.nii.gz", "--factors", "2,x"], 2, ("--factors",)),  # fmt: skip
]  # fmt: skip


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    leaked = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not leaked, f"RuntimeWarnings reached the terminal: {leaked}"
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_one_line_and_nothing_lost(case: Bad, world: dict, tmp_path: Path, capsys) -> None:
    before = _hashes(world["root"])
    code, text = _run(case.argv(world, tmp_path), capsys)
    assert code == case.code, text
    assert "Traceback" not in text
    assert any(all(w in line for w in case.words) for line in text.splitlines()), text
    assert not any(w in text for w in case.absent), text
    assert _hashes(world["root"]) == before, "an input or an existing output changed"
    if case.check is not None:
        case.check(world, tmp_path)


def test_entry_point_prints_one_line_and_checks_arguments_before_importing_torch(world, tmp_path):
    """The installed command: no traceback for a broken checkpoint; a bad --shard fails before torch loads."""
    inputs = world["inputs"]
    cmd = [sys.executable, "-m", "revgan_med", "infer", "--checkpoint", str(inputs / "no_keys.pt"),
           "--input", str(inputs / "ct" / "good.nii.gz"), "--output", str(tmp_path / "o.nii.gz")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"revgan-med infer: error: {world['inputs'] / 'no_keys.pt'}: checkpoint lacks intensity "
        "(damaged, or not written by revgan-med train)"
    ]
    probe = (
        "import sys; from revgan_med.cli import main; "
        "code = main(['infer', '--checkpoint', 'c.pt', '--input', 'i', '--output', 'o', '--shard', '4/2']); "
        "print(code, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.split() == ["2", "False"], result.stderr


def test_pairs_case_outside_output_via_a_symlink_is_refused(world, tmp_path, capsys):
    """The write helper itself proves the destination: a case folder that is a link out of OUTPUT_DIR."""
    out = tmp_path / "prep"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "good").symlink_to(elsewhere)
    before = _hashes(world["root"])
    code, text = _run(["preprocess", str(world["inputs"] / "ct"), str(out), "--task", "ct-sr"], capsys)
    assert code == 1 and "refusing to write outside the output folder" in text
    assert list(elsewhere.iterdir()) == [] and _hashes(world["root"]) == before


def test_resume_redoes_a_changed_input_and_removes_stale_temporary_files(tmp_path, capsys):
    scans = tmp_path / "scans"
    save_volume(_scan(1), AFFINE, scans / "chest1.nii.gz")
    save_volume(_scan(2), AFFINE, scans / "chest2.nii.gz")
    save_dicom_series(np.round(_scan(3)), AFFINE, scans / "series", series_description="s")
    out = tmp_path / "prep"
    argv = ["preprocess", str(scans), str(out), "--task", "ct-sr", "--factors", "2,2,2"]
    assert _run(argv, capsys)[0] == 0
    stale = out / "chest1" / ".target.nii.gz.ab12cd34.tmp.nii.gz"  # what a kill -9 mid-write leaves
    stale.write_bytes(b"half a volume")
    shutil.copy(scans / "chest2.nii.gz", scans / "chest1.nii.gz")  # a different scan under the old name
    code, text = _run(argv, capsys)
    assert code == 0 and "1 ok, 2 skipped, 0 failed" in text
    np.testing.assert_array_equal(load_volume(out / "chest1" / "target.nii.gz")[0], _scan(2))
    assert not stale.exists()
    save_dicom_series(np.round(_scan(4)), AFFINE, scans / "series", series_description="s", overwrite=True)
    code, text = _run(argv, capsys)  # a new series in the old folder: its UID and files differ
    assert code == 0 and "1 ok, 2 skipped, 0 failed" in text
    np.testing.assert_allclose(load_volume(out / "series" / "target.nii.gz")[0], np.round(_scan(4)), atol=0.5)
    assert _run(argv, capsys)[1].startswith("0 ok, 3 skipped")  # unchanged inputs: nothing redone


def test_shards_together_make_every_case_once(tmp_path, capsys):
    scans = tmp_path / "scans"
    for seed in range(3):
        save_volume(_scan(seed), AFFINE, scans / f"c{seed}.nii.gz")
    out = tmp_path / "prep"
    for shard in ("0/2", "1/2"):
        argv = ["preprocess", str(scans), str(out), "--task", "ct-sr", "--factors", "2,2,2", "--shard", shard]
        assert _run(argv, capsys)[0] == 0
    first = (out / "report.shard0of2.csv").read_text().splitlines()[1:]
    second = (out / "report.shard1of2.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in first + second] == ["c0", "c1", "c2"]
    datalist = json.loads((out / "datalist.json").read_text())
    listed = sorted(e["target"] for e in datalist["training"] + datalist["validation"])
    assert listed == ["c0/target.nii.gz", "c1/target.nii.gz", "c2/target.nii.gz"]


def test_odd_but_legitimate_inputs_still_work(world, tmp_path, capsys):
    """A non-ASCII case name with spaces, a constant volume, an odd-sized thin scan, identical volumes."""
    code, text = _run(_pairs("odd.csv")(world, tmp_path), capsys)
    assert code == 0, text
    assert (tmp_path / "prep" / "Müller ü 1" / "target.nii.gz").is_file()
    flat = tmp_path / "flat"
    save_volume(np.full(SHAPE, -1000.0, np.float32), AFFINE, flat / "air.nii.gz")
    assert _run(["preprocess", str(flat), str(tmp_path / "p2"), "--task", "ct-sr"], capsys)[0] == 0
    thin = tmp_path / "thin.nii.gz"
    save_volume(_scan(3, (17, 19, 16))[:, :, :3], AFFINE, thin)
    code, text = _run(_infer("run", "ct/good.nii.gz", str(tmp_path / "o.nii.gz"))(world, tmp_path), capsys)
    assert code == 0, text
    out = tmp_path / "thin_out.nii.gz"
    argv = ["infer", "--checkpoint", str(world["ckpt"]), "--input", str(thin), "--output", str(out)]
    assert _run([*argv, "--device", "cpu"], capsys)[0] == 0
    assert load_volume(out)[0].shape == (17, 19, 3) and np.isfinite(load_volume(out)[0]).all()
    ref = str(world["inputs"] / "ct" / "good.nii.gz")
    code, text = _run(["evaluate", "--prediction", ref, "--reference", ref, "--window", "nlst"], capsys)
    assert code == 0 and "inf" in text  # identical volumes: PSNR is infinite, not an error


def test_nifti_size_checks_come_before_allocating(world, tmp_path, monkeypatch):
    import tracemalloc

    import revgan_med.io.volumes as volumes

    tracemalloc.start()
    with pytest.raises(volumes.VolumeError, match="header claims"):
        load_volume(world["inputs"] / "huge" / "claims.nii.gz")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6  # the 1.5 GB the header claims were never allocated
    monkeypatch.setattr(volumes, "available_memory", lambda: 1000)
    with pytest.raises(volumes.VolumeError, match=r"needs 0\.0 GB of memory as float32, 0\.0 GB available"):
        load_volume(world["inputs"] / "ct" / "good.nii.gz")
    plain = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), plain)
    plain.write_bytes(plain.read_bytes()[:2000])  # an uncompressed file cut short
    monkeypatch.undo()
    with pytest.raises(volumes.VolumeError, match="file holds at most 0.0 MB"):
        load_volume(plain)


def test_nan_weights_are_never_checkpointed():
    from revgan_med.training.guards import NonFiniteLoss, require_finite_weights

    layer = torch.nn.Conv3d(1, 2, 3)
    require_finite_weights({"generator": layer}, 4)  # finite: no error
    with torch.no_grad():
        layer.bias[1] = float("inf")
    with pytest.raises(NonFiniteLoss, match=r"step 4: weight generator\.bias is not finite"):
        require_finite_weights({"generator": layer}, 4)


def test_infer_refuses_to_write_a_non_finite_output(world, tmp_path, capsys):
    payload = load_checkpoint(world["ckpt"])
    weights = payload["models"]["generator"]
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim > 1)
    weights[key] = torch.full_like(weights[key], float("nan"))
    broken = save_checkpoint(tmp_path / "nan_weights.pt", payload)
    argv = ["infer", "--checkpoint", str(broken), "--input", str(world["inputs"] / "ct" / "good.nii.gz"),
            "--output", str(tmp_path / "out.nii.gz"), "--device", "cpu"]  # fmt: skip
    code, text = _run(argv, capsys)
    assert code == 1 and "the model's output" in text and "NaN or infinite" in text
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_failing_scan_of_a_folder_is_named_once_and_the_others_still_run(world, tmp_path, capsys):
    code, text = _run(_infer("run", "inf", "{t}/out")(world, tmp_path), capsys)
    line = next(line for line in text.splitlines() if line.startswith("FAILED"))
    scan = str(world["inputs"] / "inf" / "good.nii.gz")
    assert code == 1 and line.startswith(f"FAILED {scan}: ") and line.count("good.nii.gz") == 1, line
    assert "9 of 4096" in line and "1 written, 1 failed" in text  # other.nii.gz still ran


def test_a_failed_new_run_removes_only_what_it_wrote(tmp_path):
    from revgan_med.training.guards import fresh_run_cleanup

    run = tmp_path / "shared_folder"
    run.mkdir()
    (run / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError), fresh_run_cleanup(run, enabled=True):
        (run / "config.yaml").write_text("task: ct-sr")
        (run / "tensorboard").mkdir()
        (run / "metrics.csv").write_text("step")
        (run / "other.log").write_text("another program's, written meanwhile")
        raise RuntimeError("failed before the first checkpoint")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "other.log"]
