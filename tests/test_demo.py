"""`revgan-med demo`: packaged config, report pieces against hand-made numbers, and one real run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from revgan_med.cli import main
from revgan_med.config import load_config
from revgan_med.demo import (
    demo_config_path,
    loss_figure,
    read_metrics_csv,
    run_demo,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(model_psnr: float, model_ssim: float) -> dict[str, dict[str, float]]:
    return {
        "prediction": {"mae": 20.0, "rmse": 40.0, "psnr": model_psnr, "ssim": model_ssim},
        "trilinear": {"mae": 35.0, "rmse": 62.0, "psnr": 27.6, "ssim": 0.876},
        "tricubic": {"mae": 28.0, "rmse": 50.0, "psnr": 29.5, "ssim": 0.914},
    }


def test_packaged_demo_config_is_the_repository_file_and_valid():
    packaged = demo_config_path()
    assert packaged.read_text() == (ROOT / "configs" / "demo.yaml").read_text()
    config = load_config(str(packaged))
    assert config.task == "ct-sr" and config.objective == "paired"
    assert config.data.factors == [2, 2, 4]


def test_wheel_ships_the_configs(tmp_path):
    # Build a wheel from a copy of the sources (the link revgan_med/configs -> ../configs kept as a link)
    # and check the installed package would hold the YAML files themselves.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "revgan_med", src / "revgan_med", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copytree(ROOT / "configs", src / "configs")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("revgan_med-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        demo = archive.read("revgan_med/configs/demo.yaml").decode()
    assert demo == (ROOT / "configs" / "demo.yaml").read_text()


def test_read_metrics_csv_skips_empty_cells(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,g_loss,val_psnr\n10,5.0,\n20,4.0,21.5\n30,3.0,\n")
    curves = read_metrics_csv(path)
    assert curves["g_loss"][0].tolist() == [10.0, 20.0, 30.0]
    assert curves["g_loss"][1].tolist() == [5.0, 4.0, 3.0]
    assert curves["val_psnr"][0].tolist() == [20.0] and curves["val_psnr"][1].tolist() == [21.5]


def test_loss_figure_writes_a_png(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,g_loss,d_loss,lr,val_psnr\n1,5,1,0.1,\n2,4,0.9,0.1,20\n")
    out = loss_figure(path, tmp_path / "fig" / "curves.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("psnr", "ssim", "beats"), [(31.0, 0.95, True), (29.0, 0.95, False), (31.0, 0.9, False)]
)
def test_report_verdict_is_honest(tmp_path, psnr, ssim, beats):
    files = {"comparison figure": tmp_path / "a.png", "training curves": tmp_path / "b.png"}
    settings = {"version": "x", "torch": "y", "device": "cpu", "seed": 0, "platform": "p", "steps": 3,
                "model": "m"}  # fmt: skip
    report = write_report(
        tmp_path / "report.md", metrics=_metrics(psnr, ssim), timings={"train": 1.5}, files=files,
        settings=settings,
    )  # fmt: skip
    text = report.read_text()
    assert ("did NOT beat" in text) != beats
    assert f"{psnr - 29.5:+.2f} dB" in text  # gain against the better baseline (tricubic, 29.5 dB)
    assert "| RevGAN (this demo) | 20.00 | 40.00 |" in text


def test_demo_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        run_demo(output_dir=tmp_path, steps=1, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_a_new_demo_run_clears_only_its_own_files(tmp_path):
    from revgan_med.demo import MARKER, _clear_previous_demo

    (tmp_path / MARKER).write_text("")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_text("old")
    (tmp_path / "report.md").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    _clear_previous_demo(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "notes.txt"]


@pytest.mark.slow
def test_demo_end_to_end_beats_the_interpolation_baselines(tmp_path, capsys):
    """The whole `make demo` run (default steps, ~4 min on 2 cores): the promise of the Quick start."""
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "[6/6] report done" in printed and str(out / "report.md") in printed
    report = (out / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith(("| RevGAN", "| trilinear", "| tricubic"))]
    assert len(rows) == 3
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        values = [float(c) for c in cells[1:]]  # every cell a number: MAE, RMSE, PSNR, SSIM
        assert len(values) == 4 and 0.0 <= values[3] <= 1.0
        table[cells[0].split()[0]] = values
    model = table.pop("RevGAN")
    for name, baseline in table.items():
        assert model[0] < baseline[0] and model[2] > baseline[2] and model[3] > baseline[3], name
    assert "beat both" in report and "did NOT beat" not in report
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert (out / "test" / "prediction.nii.gz").is_file()
    assert (out / "run" / "checkpoints" / "last.pt").is_file()
    card = (out / "model.card.md").read_text()  # the demo ends with a model to hand on, and its card
    assert card.startswith("# Model card") and "training data" in card and "`model.pt`" in report


def _readme_commands(text: str) -> list[list[str]]:
    """Every `revgan-med COMMAND ...` in the README's bash blocks (also after docker run / torchrun)."""
    import shlex

    from revgan_med.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            tokens = shlex.split(line, comments=True)
            for i, token in enumerate(tokens[:-1]):
                if token in ("revgan-med", "revgan_med") and tokens[i + 1] in sub.choices:
                    commands.append(tokens[i + 1 :])
                    break
    return commands


@pytest.mark.parametrize("readme", ["README.md", "docker/README.md"])
def test_readme_commands_parse(readme):
    from revgan_med.cli import build_parser

    commands = _readme_commands((ROOT / readme).read_text())
    assert len(commands) >= 5
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{readme}: `revgan-med {' '.join(argv)}` does not parse")
