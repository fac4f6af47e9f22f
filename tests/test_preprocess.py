from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from revgan_med.cli import main
from revgan_med.data.datasets import PatchDataset, load_case, load_datalist
from revgan_med.data.phantom import make_phantom
from revgan_med.io import save_dicom_series, save_volume

SHAPE = (32, 32, 16)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _report(out: Path) -> dict[str, dict]:
    with open(out / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case", "source", "status", "message"]
    return {r["case"]: r for r in rows}


@pytest.fixture
def messy(tmp_path) -> Path:
    """Two phantom NIfTIs, a DICOM series, corrupt and truncated .nii.gz, stray files, an empty folder."""
    root = tmp_path / "in"
    for seed in (1, 2):
        hu, affine = make_phantom(SHAPE, (1.2, 1.2, 2.0), seed=seed)
        save_volume(hu, affine, root / f"patient{seed}" / "ct.nii.gz")
    hu, affine = make_phantom((34, 30, 10), (1.0, 1.0, 2.5), seed=3)  # not a multiple of the factors
    save_dicom_series(np.round(hu), affine, root / "dicom" / "series", series_description="phantom")
    (root / "bad").mkdir()
    (root / "bad" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + bytes(range(200)))
    good = gzip.compress(
        nib.Nifti1Image(
            np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32), np.eye(4)
        ).to_bytes()
    )
    (root / "bad" / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
    (root / "notes.txt").write_text("not a scan")
    (root / "patient1" / ".DS_Store").write_bytes(b"\0\0")
    (root / "empty").mkdir()
    return root


def test_messy_folder_writes_good_cases_and_names_bad_ones(messy, tmp_path, capsys):
    out = tmp_path / "out"
    before = _hashes(messy)
    assert main(["preprocess", str(messy), str(out), "--task", "ct-sr", "--workers", "2"]) == 1
    assert _hashes(messy) == before, "inputs must never be modified"
    report = _report(out)
    assert {k: r["status"] for k, r in report.items()} == {
        "patient1_ct": "ok", "patient2_ct": "ok", "dicom_series": "ok",
        "bad_corrupt": "failed", "bad_truncated": "failed",
    }  # fmt: skip
    assert "corrupt.nii.gz" in report["bad_corrupt"]["message"]
    assert "truncated.nii.gz" in report["bad_truncated"]["message"]
    assert "failed: bad_corrupt" in capsys.readouterr().err

    # LR input on its own grid: exactly the thick-slice geometry of the (cropped) HR target
    target = nib.load(out / "dicom_series" / "target.nii.gz")
    image = nib.load(out / "dicom_series" / "image.nii.gz")
    assert target.shape == (34, 30, 8) and image.shape == (17, 15, 2)
    centre = image.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(centre[:3], (target.affine @ [0.5, 0.5, 1.5, 1])[:3], atol=1e-4)
    assert b"simulated" in image.header["descrip"].tobytes()
    hu = np.asarray(target.dataobj)
    assert image.get_fdata()[3, 4, 1] == pytest.approx(hu[6:8, 8:10, 4:8].mean(), abs=1e-3)

    datalist = json.loads((out / "datalist.json").read_text())
    entries = datalist["training"] + datalist["validation"]
    assert len(datalist["validation"]) >= 1 and len(entries) == 3
    assert all(not Path(e["image"]).is_absolute() and (out / e["target"]).is_file() for e in entries)

    # the training side reads it back: input mapped onto the target grid, patches of the right size
    cases = load_datalist(out / "datalist.json", "training") + load_datalist(
        out / "datalist.json", "validation"
    )
    case = load_case(
        cases[0], task="ct-sr", intensity_or_window="chest-1024", factors=(2, 2, 4), upsample="nearest"
    )
    assert case["image"].shape == case["target"].shape
    kwargs = dict(task="ct-sr", intensity_or_window="chest-1024", factors=(2, 2, 4), upsample="trilinear")
    ds = PatchDataset(cases, patch_size=(16, 16, 8), samples_per_volume=2, foreground_fraction=0.01, **kwargs)
    assert ds[5]["image"].shape == (1, 16, 16, 8)

    # second run: done cases are skipped, bad ones fail again, nothing is rewritten
    stamp = (out / "patient1_ct" / "target.nii.gz").stat().st_mtime_ns
    assert main(["preprocess", str(messy), str(out), "--task", "ct-sr"]) == 1
    again = _report(out)
    assert [again[c]["status"] for c in ("patient1_ct", "patient2_ct", "dicom_series")] == ["skipped"] * 3
    assert again["bad_truncated"]["status"] == "failed"
    assert (out / "patient1_ct" / "target.nii.gz").stat().st_mtime_ns == stamp
    assert json.loads((out / "datalist.json").read_text()) == datalist

    # --overwrite redoes them; different factors are not mistaken for done work
    assert main(["preprocess", str(messy), str(out), "--task", "ct-sr", "--overwrite"]) == 1
    assert _report(out)["patient1_ct"]["status"] == "ok"
    assert main(["preprocess", str(messy), str(out), "--task", "ct-sr", "--factors", "2,2,2"]) == 1
    assert _report(out)["patient1_ct"]["status"] == "ok"
    assert nib.load(out / "patient1_ct" / "image.nii.gz").shape == (16, 16, 8)


def test_all_good_exits_0_and_output_inside_input_is_not_rediscovered(tmp_path):
    root = tmp_path / "in"
    hu, affine = make_phantom(SHAPE, seed=5)
    save_volume(hu, affine, root / "only.nii.gz")
    assert main(["preprocess", str(root), str(root / "prep"), "--task", "ct-sr"]) == 0
    assert main(["preprocess", str(root), str(root / "prep"), "--task", "ct-sr"]) == 0
    assert list(_report(root / "prep")) == ["only"]
    datalist = json.loads((root / "prep" / "datalist.json").read_text())
    assert len(datalist["training"]) == 1 and datalist["validation"] == []  # one case: nothing to hold out


def test_validation_fraction_zero_trains_every_case_and_out_of_range_is_a_usage_error(tmp_path, capsys):
    root = tmp_path / "in"
    for seed in (1, 2):
        save_volume(*make_phantom(SHAPE, seed=seed), root / f"p{seed}.nii.gz")
    out = tmp_path / "prep"
    assert main(["preprocess", str(root), str(out), "--task", "ct-sr", "--val-fraction", "0"]) == 0
    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["target"] for e in datalist["training"]] == ["p1/target.nii.gz", "p2/target.nii.gz"]
    assert datalist["validation"] == []
    assert main(["preprocess", str(root), str(out), "--task", "ct-sr"]) == 0  # default 0.2 of 2: one case
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) == 1 and len(datalist["validation"]) == 1
    for bad in ("1", "-0.1"):
        assert main(["preprocess", str(root), str(out), "--task", "ct-sr", "--val-fraction", bad]) == 2
        assert "validation fraction" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "missing"), str(tmp_path / "o"), "--task", "ct-sr"]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    assert (
        main(["preprocess", str(tmp_path / "in"), str(tmp_path / "o"), "--task", "ct-sr", "--window", "x"])
        == 2
    )
    assert (
        main(
            ["preprocess", str(tmp_path / "in"), str(tmp_path / "o"), "--task", "ct-sr", "--simulate-kernel"]
        )
        == 2
    )
    with pytest.raises(SystemExit) as info:
        main(["preprocess", str(tmp_path / "in"), str(tmp_path / "o"), "--task", "ct-sr", "--factors", "2,2"])
    assert info.value.code == 2


def test_kernel_pairs_layout_csv_and_simulation(tmp_path):
    root = tmp_path / "pairs"
    smooth, affine = make_phantom(SHAPE, seed=1, kernel="smooth")
    sharp, _ = make_phantom(SHAPE, seed=1, kernel="sharp")
    save_volume(smooth, affine, root / "good" / "source.nii.gz")
    save_dicom_series(np.round(sharp), affine, root / "good" / "target", series_description="sharp")
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    save_volume(smooth, affine, root / "shifted" / "source.nii.gz")
    save_volume(sharp, shifted, root / "shifted" / "target.nii.gz")
    save_volume(smooth, affine, root / "lonely" / "source.nii.gz")
    out = tmp_path / "out"
    assert main(["preprocess", str(root), str(out), "--task", "ct-kernel", "--window", "nlst"]) == 1
    report = _report(out)
    assert report["good"]["status"] == "ok"
    assert "grids do not coincide" in report["shifted"]["message"]
    assert "expected 'source' and 'target'" in report["lonely"]["message"]
    np.testing.assert_allclose(
        nib.load(out / "good" / "target.nii.gz").get_fdata(), np.round(sharp), atol=0.51
    )
    spec = json.loads((out / "datalist.json").read_text())["spec"]  # the data facts train checks
    assert spec == {"task": "ct-kernel", "channels": 1, "window": [-900.0, 400.0], "factors": [1, 1, 1],
                    "upsample": None, "patch_size": None}  # fmt: skip

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("case,source,target\nc1,pairs/good/source.nii.gz,pairs/good/target\n")
    assert (
        main(
            [
                "preprocess",
                str(root),
                str(tmp_path / "out_csv"),
                "--task",
                "ct-kernel",
                "--pairs",
                str(csv_path),
            ]
        )
        == 0
    )

    single = tmp_path / "single"
    save_volume(make_phantom(SHAPE, seed=2)[0], affine, single / "scan.nii.gz")
    sim = tmp_path / "sim"
    assert main(["preprocess", str(single), str(sim), "--task", "ct-kernel", "--simulate-kernel"]) == 0
    assert b"SIMULATED" in nib.load(sim / "scan" / "image.nii.gz").header["descrip"].tobytes()
    assert "SIMULATED" in _report(sim)["scan"]["message"]
    assert json.loads((sim / "scan" / "case.json").read_text())["simulate_kernel"] is True


def test_dmri_on_the_shared_dwi(shared_data, tmp_path):
    src = shared_data / "dwi_brain_philips"
    root = tmp_path / "dwi"
    root.mkdir()
    for suffix in (".nii.gz", ".bval", ".bvec", ".json"):
        shutil.copy(src / f"701_DTI_Biobank_2mm_MB3S2_EPI{suffix}", root)
    out = tmp_path / "out"
    assert main(["preprocess", str(root), str(out), "--task", "dmri-sr", "--factors", "2,2,2"]) == 0
    case = out / "701_DTI_Biobank_2mm_MB3S2_EPI"
    target, image, mask = (nib.load(case / f"{n}.nii.gz") for n in ("target", "image", "mask"))
    assert (
        target.shape == (112, 112, 32, 6) and image.shape == (56, 56, 16, 6) and mask.shape == (112, 112, 32)
    )
    dti = target.get_fdata()
    inside = mask.get_fdata() > 0
    md = (dti[..., 0] + dti[..., 2] + dti[..., 5]) / 3
    assert 5e-4 < np.median(md[inside]) < 1.3e-3  # brain mean diffusivity, mm²/s
    entry = json.loads((out / "datalist.json").read_text())["training"][0]
    assert entry["mask"].endswith("mask.nii.gz")


def test_real_kernel_pair_from_a_pairs_csv(shared_data, tmp_path):
    pair = shared_data / "ct_kernel_pair_philips_B_L"
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f"case,source,target\nphilips,{pair / 'B'},{pair / 'L'}\n")
    out = tmp_path / "out"
    assert main(["preprocess", str(pair), str(out), "--task", "ct-kernel", "--pairs", str(csv_path)]) == 0
    smooth, sharp = (nib.load(out / "philips" / f"{n}.nii.gz") for n in ("image", "target"))
    assert smooth.shape == sharp.shape == (512, 512, 20)
    np.testing.assert_allclose(smooth.affine, sharp.affine, atol=1e-2)
    b, l = smooth.get_fdata(), sharp.get_fdata()
    assert np.corrcoef(b.ravel(), l.ravel())[0, 1] > 0.9  # the same acquisition
    assert np.diff(l, axis=0).std() > 1.5 * np.diff(b, axis=0).std()  # L is the sharp kernel
