"""Export: the model file, TorchScript and the MONAI bundle reproduce `revgan-med infer`."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from revgan_med.cli import main
from revgan_med.io import load_volume, save_volume
from tests._training_data import AFFINE, tiny_config, write_kernel_datalist

HU_PER_UNIT = 650.0  # the tiny config's nlst window [-900, 400] HU maps onto [-1, 1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (6-step) training run of a two-way kernel model: best.pt with optimisers and RNG states."""
    from revgan_med.training.loop import train

    folder = tmp_path_factory.mktemp("export")
    datalist = write_kernel_datalist(folder / "data", cases=2, shape=(24, 24, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tiny_config(datalist), folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def scan(run: Path) -> Path:
    rng = np.random.default_rng(3)
    path = run.parent / "scan.nii.gz"
    save_volume((rng.normal(size=(20, 18, 12)) * 300 - 200).astype(np.float32), AFFINE, path)
    return path


def test_model_file_is_small_runs_like_the_checkpoint_and_is_refused_by_resume(
    run: Path, scan: Path, tmp_path: Path, capsys
) -> None:
    best = run / "checkpoints" / "best.pt"
    model = tmp_path / "kernel.pt"
    assert main(["export", "--checkpoint", str(best), "-o", str(model), "--licence", "CC-BY-4.0"]) == 0
    assert model.stat().st_size < best.stat().st_size / 2  # no optimisers, discriminators, RNG, pools
    payload = torch.load(model, weights_only=True)
    card = payload["card"]
    assert card["licence"] == "CC-BY-4.0" and card["steps"] == 6 and card["task"] == "ct-kernel"
    assert card["output"] == "one pass"  # the tiny config leaves infer.ensemble off
    assert card["training_data"]["cases"] == 1 and card["training_data"]["voxel_spacings_mm"] == [
        [1.5, 1.5, 2.0]
    ]
    baseline, back = "baseline: identity (the input)", "baseline (inverse): identity (the input)"  # no paths
    assert set(card["validation"]) == {
        "cases", "model", baseline, "model (inverse)", back, "psnr_margin_db", "error_map_calibration"
    }  # fmt: skip
    validation = card["validation"]
    pairs = (("model", baseline), ("model (inverse)", back))
    margins = [validation[model]["psnr"] - validation[base]["psnr"] for model, base in pairs]
    assert validation["psnr_margin_db"] == pytest.approx(sum(margins) / 2)  # both directions count alike
    assert set(card["validation"]["error_map_calibration"]) == {"top_mae", "rest_mae", "ratio", "spearman"}
    assert card["versions"]["torch"] == torch.__version__
    assert (tmp_path / "kernel.card.md").read_text().startswith("# Model card")
    outputs = {}
    for name, source in (("checkpoint", best), ("model", model)):
        out = tmp_path / f"{name}.nii.gz"
        argv = ["infer", "--checkpoint", str(source), "-i", str(scan), "-o", str(out), "--device", "cpu"]
        assert main([*argv, "--direction", "inverse"]) == 0
        outputs[name] = load_volume(out)[0]
    np.testing.assert_array_equal(outputs["checkpoint"], outputs["model"])
    # a resume that finds an exported model instead of a training checkpoint: one line, exit 1
    (run.parent / "resume" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run.parent / "resume" / "config.yaml").write_text((run / "config.yaml").read_text())
    (run.parent / "resume" / "checkpoints" / "last.pt").write_bytes(model.read_bytes())
    capsys.readouterr()
    assert main(["train", "--output", str(run.parent / "resume"), "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exported model" in err


def test_torchscript_equals_eager_and_runs_without_revgan_med(run: Path, tmp_path: Path, monkeypatch) -> None:
    from revgan_med.inference import load_model

    ts = tmp_path / "kernel.ts"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "best.pt"), "-o", str(ts),
                 "--format", "torchscript"]) == 0  # fmt: skip
    eager = load_model(run / "checkpoints" / "best.pt", device="cpu").generator
    x = torch.randn(1, 1, 20, 16, 12, generator=torch.Generator().manual_seed(0))  # not the traced size
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, torch\n"
        f"m = torch.jit.load({str(ts)!r})\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'f.npy')!r}, m(x).numpy())\n"
        f"    np.save({str(tmp_path / 'g.npy')!r}, m.inverse(x).numpy())\n"
        "assert not any(n.startswith('revgan_med') for n in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with torch.no_grad():
        np.testing.assert_allclose(np.load(tmp_path / "f.npy"), eager(x).numpy(), atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / "g.npy"), eager.inverse(x).numpy(), atol=1e-5)
    extra = {"spec.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    spec = json.loads(extra["spec.json"])
    assert spec["config"]["task"] == "ct-kernel" and spec["traced_size"] == [24, 24, 24]
    # README's TorchScript example, run as written on one window: the eager model's output in HU
    from tests.test_api import _python_block

    ts.rename(tmp_path / "ct_kernel.ts")
    hu = (np.random.default_rng(2).normal(size=(24, 24, 24)) * 300).astype(np.float32)
    np.save(tmp_path / "window.npy", hu)
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)
    exec(_python_block("### Export"), namespace)  # noqa: S102 (README's own example)
    lo, hi = -900.0, 400.0  # the tiny config's nlst window
    with torch.no_grad():
        y = eager(torch.from_numpy((np.clip(hu, lo, hi) - lo) / (hi - lo) * 2 - 1)[None, None])
    expected = (y[0, 0].clamp(-1, 1).numpy() + 1) / 2 * (hi - lo) + lo
    np.testing.assert_allclose(namespace["out"], expected, atol=1e-5 * HU_PER_UNIT)


@pytest.mark.slow  # four fresh processes that import MONAI
def test_monai_bundle_reproduces_infer_both_directions(run: Path, scan: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    bundle = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "best.pt"), "-o", str(bundle),
                 "--format", "bundle"]) == 0  # fmt: skip
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / part).is_file(), part
    for direction in ("forward", "inverse"):
        reference = tmp_path / f"infer_{direction}.nii.gz"
        assert main(["infer", "--checkpoint", str(run / "checkpoints" / "best.pt"), "-i", str(scan),
                     "-o", str(reference), "--direction", direction, "--device", "cpu"]) == 0  # fmt: skip
        parser = ConfigParser()
        parser.read_config(bundle / "configs" / "inference.json")
        parser.update({"bundle_root": str(bundle), "direction": direction, "device": "$torch.device('cpu')"})
        network = parser.get_parsed_content("network")
        assert isinstance(network, torch.nn.Module) and not network.training
        pipeline = parser.get_parsed_content("pipeline")
        mine = pipeline(scan, tmp_path / f"parser_{direction}.nii.gz")
        np.testing.assert_allclose(load_volume(mine)[0], load_volume(reference)[0], atol=1e-4 * HU_PER_UNIT)
        # MONAI's own runner, input overridden on its command line, in a fresh process
        out = tmp_path / f"run_{direction}.nii.gz"
        config = str(bundle / "configs" / "inference.json")
        subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", config,
             "--bundle_root", str(bundle), "--input_path", str(scan), "--output_path", str(out),
             "--direction", direction],
            check=True, capture_output=True,
        )  # fmt: skip
        np.testing.assert_allclose(load_volume(out)[0], load_volume(reference)[0], atol=1e-4 * HU_PER_UNIT)


def test_monai_bundle_keeps_the_checkpoints_flip_ensemble(run: Path, scan: Path, tmp_path: Path) -> None:
    """A checkpoint with ``infer.ensemble: true``: its bundle's pipeline writes what ``infer`` writes by
    default, which is the flip ensemble (``--ensemble``), not the plain output (``--no-ensemble``)."""
    from monai.bundle import ConfigParser

    from revgan_med.checkpoints import load_checkpoint, save_checkpoint

    payload = load_checkpoint(run / "checkpoints" / "best.pt")
    payload["config"]["infer"]["ensemble"] = True
    checkpoint = save_checkpoint(tmp_path / "ensemble.pt", payload)
    bundle = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(bundle), "--format", "bundle"]) == 0
    card = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert "flip self-ensemble" in json.dumps(card)
    outputs = {}
    for flag in ("--ensemble", "--no-ensemble"):
        outputs[flag] = tmp_path / f"infer{flag}.nii.gz"
        assert main(["infer", "--checkpoint", str(checkpoint), "-i", str(scan), "-o", str(outputs[flag]),
                     "--device", "cpu", flag]) == 0  # fmt: skip
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    mine = load_volume(parser.get_parsed_content("pipeline")(scan, tmp_path / "bundle.nii.gz"))[0]
    np.testing.assert_allclose(mine, load_volume(outputs["--ensemble"])[0], atol=1e-4 * HU_PER_UNIT)
    assert not np.allclose(mine, load_volume(outputs["--no-ensemble"])[0], atol=1e-2 * HU_PER_UNIT)


def test_vendor_and_kernel_from_dicom_headers_and_sidecars(shared_data: Path, tmp_path: Path) -> None:
    from revgan_med.export import _case_sources, _scanner_info

    dicom = _scanner_info(shared_data / "ct_chest_dicom_philips" / "dcm")
    assert "philips" in dicom["vendor"].lower() and dicom["kernel"] == "C"  # the data README's kernel C
    nifti = shared_data / "ct_kernel_pair_phantom_UB_YA" / "203_BONE_BRAIN_1MM_YA_z46-93.nii.gz"
    sidecar = json.loads((nifti.parent / "203_BONE_BRAIN_1MM_YA.json").read_text())
    assert _scanner_info(nifti) == {"vendor": sidecar["Manufacturer"], "kernel": sidecar["ConvolutionKernel"]}
    assert _case_sources(tmp_path / "case.json") == []  # a case.json that is gone: no sources, no error
    (tmp_path / "case.json").write_text(json.dumps({"source": "scans/B (series 1.2.3) -> scans/L"}))
    assert _case_sources(tmp_path / "case.json") == [Path("scans/B"), Path("scans/L")]
