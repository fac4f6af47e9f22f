"""Device check: the accelerator paths of training and inference in one table, in minutes.

Runs, on `--device` (default: the GPU), and fails (exit 1) on any mismatch:

- ``memory``: `benchmark memory` at small sizes: saved-activation ratio depth 8 / depth 2 of the
  memory-saving core (≤ 1.05) and its step time vs plain autograd (CUDA only: the CPU table is
  in ``benchmarks/README.md``);
- ``amp``: a kernel-conversion model (residual, fitted [7, 7, 1] linear path) trained briefly on the
  first half of the slices of a kernel pair (`--pair` folder with ``B/`` and ``L/``; default a
  SIMULATED pair of a phantom), run by `infer_volume` with and without ``amp``: mean and 99th
  percentile of |amp − float32| in HU over the body (targets ≤ 1 and ≤ 5 HU);
- ``resume``: ``revgan-med train`` of a tiny config killed with SIGKILL after its first checkpoint,
  resumed to the end; the resumed weights must be finite and near a straight run's;
- ``torchrun``: a 2-process ``torchrun`` training run on the one device (nccl, falling back to gloo
  when NCCL refuses two ranks on one GPU; gloo on the CPU);
- ``infer``: ``revgan-med infer`` of a synthetic CT (`--infer-shape`, default 512×512×300) with the
  kernel model: wall time and peak GPU memory;
- ``small-gpu``: the same scan with the GPU capped at half that peak: the automatic windows must
  shrink on the out-of-memory error and still finish (CUDA only).

Examples:
  revgan-med benchmark gpu
  revgan-med benchmark gpu --pair /data/ct_kernel_pair_philips_B_L --json gpu.json
  revgan-med benchmark gpu --device cpu --infer-shape 48,48,16 --amp-steps 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from revgan_med.benchmarks import write_json

HELP = "device check: memory, AMP in HU, kill + resume, torchrun, whole-scan infer, small GPU (one table)"
AMP_MEAN_HU, AMP_P99_HU = 1.0, 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu (default: auto)")
    parser.add_argument("--pair", type=Path, default=None, help="kernel pair folder with B/ and L/")
    parser.add_argument("--amp-steps", type=int, default=30, help="training steps of the kernel model")
    parser.add_argument("--infer-shape", default="512,512,300", help="synthetic CT X,Y,Z for infer")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    shape = tuple(int(v) for v in args.infer_shape.split(","))
    result = run_checks(
        device=args.device, pair=args.pair, amp_steps=args.amp_steps, infer_shape=shape,
        skip=set(filter(None, args.skip.split(","))),
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    print(format_table(result))
    write_json(args.json, result)
    return 0 if result["ok"] else 1


def _row(check: str, ok: bool | None, value: str, note: str = "") -> dict[str, Any]:
    return {"check": check, "ok": ok, "value": value, "note": note}


def _memory(device: Any) -> dict[str, Any]:
    from revgan_med.benchmarks.memory import run_benchmark

    if device.type != "cuda":
        return _row("memory", None, "-", "skipped: CUDA only (CPU table in benchmarks/README.md)")
    r = run_benchmark(depths=[2, 8], size=64, width=16, check_depth=4, device=str(device), repeats=1)
    ratios, saving = r["ratios"], r["ratios"].get("memory-saving", {})
    nan = float("nan")
    plain = ratios.get("plain", {}).get("saved", nan)
    value = (f"saved d8/d2 {saving.get('saved', nan):.2f} (plain {plain:.2f}), peak d8/d2 "
             f"{saving.get('peak', nan):.2f}, step vs plain {ratios['time_vs_plain'].get(8, nan):.2f}")
    memcnn = ratios["time_vs_memcnn"].get(8)
    value += f", vs MemCNN {memcnn:.2f}" if memcnn is not None else ""
    ok = not r["failures"] and saving.get("saved", 9.0) <= 1.05 and r["check"]["inverse_error"] < 1e-4
    return _row("memory", ok, value, "" if memcnn is not None else "MemCNN not installed")


def _kernel_pair(pair: Path | None) -> tuple[Any, Any, Any]:
    """(smooth HU, sharp HU, affine): the folder's B/L series, else a SIMULATED pair of a phantom."""
    import numpy as np

    from revgan_med.data.degradation import simulate_kernel_pair
    from revgan_med.data.phantom import make_phantom
    from revgan_med.io import load_volume

    if pair is not None:
        (smooth, affine), (sharp, _) = load_volume(pair / "B"), load_volume(pair / "L")
        return np.asarray(smooth, np.float32), np.asarray(sharp, np.float32), affine
    hu, affine = make_phantom((96, 96, 24), (0.8, 0.8, 2.0), seed=0)
    smooth, sharp = simulate_kernel_pair(hu, (0.8, 0.8, 2.0), seed=0)
    return smooth, sharp, affine


def kernel_model(smooth: Any, sharp: Any, *, steps: int, device: Any, width: int = 16) -> Any:
    """A paired kernel model (rev_resnet3d, residual, fitted [7, 7, 1] linear paths, ``ct-full``
    window) trained `steps` L1 steps (no GAN: the half-slabs are thinner than a PatchGAN needs) on
    patches of the first half of the slices → `checkpoints.Model`."""
    import numpy as np
    import torch

    from revgan_med.checkpoints import Model
    from revgan_med.data.transforms import intensity_for_task
    from revgan_med.training.quickfit import build, cut, fit, random_origin

    window = intensity_for_task("ct-kernel", "ct-full")
    x, y = (window.normalize(v)[None].astype(np.float32) for v in (smooth, sharp))
    half = max(1, x.shape[3] // 2)
    size = [min(64, x.shape[1]), min(64, x.shape[2]), half]
    bounds = [(0, x.shape[1]), (0, x.shape[2]), (0, half)]

    def batches(step: int) -> dict[str, torch.Tensor]:
        origin = random_origin(np.random.default_rng(step), bounds, size)
        pair = (("image", x), ("target", y))
        return {k: torch.from_numpy(cut(v, origin, size).copy())[None] for k, v in pair}

    torch.manual_seed(0)
    objective, optimizers = build("paired", generator="rev_resnet3d", width=width, depth=2, disc_width=8,
                                  loss={"gan": "none"}, patch_size=size, linear_kernel=[7, 7, 1],
                                  lr=2e-4)  # fmt: skip
    fit(objective, optimizers, batches, steps=steps, device=device, linear_fit_batches=8, log=lambda m: None)
    generator = objective.generator.eval()
    return Model(generator, "ct-kernel", window.to_dict(), tuple(size), margin=generator.receptive_radius(),
                 device=device, name="rev_resnet3d ct-kernel")  # fmt: skip


def amp_error(model: Any, smooth: Any, affine: Any) -> dict[str, float]:
    """|amp − float32| of `infer_volume` in HU over the body (input > −500 HU, holes per slice filled)."""
    import numpy as np
    from scipy import ndimage

    from revgan_med.inference import infer_volume

    full = infer_volume(model, smooth, affine).array
    mixed = infer_volume(model, smooth, affine, amp=True).array
    body = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(smooth > -500, 2, 0)], axis=2)
    diff = np.abs(mixed - full)[body]
    p99 = float(np.percentile(diff, 99))
    return {"mean_hu": float(diff.mean()), "p99_hu": p99, "voxels": int(body.sum())}


def _amp(device: Any, pair: Path | None, steps: int) -> tuple[dict[str, Any], Any]:
    from revgan_med.runtime import amp_dtype

    smooth, sharp, affine = _kernel_pair(pair)
    model = kernel_model(smooth, sharp, steps=steps, device=device)
    err = amp_error(model, smooth, affine)
    ok = err["mean_hu"] <= AMP_MEAN_HU and err["p99_hu"] <= AMP_P99_HU
    source = pair.name if pair is not None else "simulated phantom pair"
    value = f"mean {err['mean_hu']:.3f} HU, p99 {err['p99_hu']:.3f} HU"
    return _row("amp", ok, value, f"{amp_dtype(device)} vs float32, body of {source}"), model


def _tiny_run(work: Path, device: Any) -> list[str]:
    """A tiny kernel datalist and the ``--config`` arguments of a 30-step `revgan-med train` run on it."""
    import json

    import numpy as np

    from revgan_med.config import config_from_dict, save_config
    from revgan_med.data.phantom import make_phantom
    from revgan_med.io import save_volume

    work.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(2):
        for kernel in ("smooth", "sharp"):
            hu, affine = make_phantom((32, 32, 32), seed=i, kernel=kernel)
            save_volume(np.asarray(hu, np.float32), affine, work / f"case{i}" / f"{kernel}.nii.gz")
        entries.append({"image": f"case{i}/smooth.nii.gz", "target": f"case{i}/sharp.nii.gz"})
    datalist = work / "datalist.json"
    datalist.write_text(json.dumps({"training": entries, "validation": entries[:1]}))
    config = config_from_dict({
        "task": "ct-kernel",
        "data": {"datalist": str(datalist), "window": "nlst", "patch_size": [24, 24, 24], "num_workers": 0},
        "model": {"generator": "rev_resnet3d", "width": 4, "depth": 2, "disc_width": 4},
        "train": {"steps": 30, "checkpoint_every": 10, "val_every": 30, "decay_start": 15,
                  "device": str(device)},
    })  # fmt: skip
    save_config(config, work / "config.yaml")
    return ["--config", str(work / "config.yaml")]


def _train_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "revgan_med", "train", *extra]


def _resume(device: Any, work: Path) -> dict[str, Any]:
    import torch

    from revgan_med.checkpoints import load_checkpoint

    sets = _tiny_run(work, device)
    run, straight = work / "killed", work / "straight"
    process = subprocess.Popen(_train_cmd("--output", str(run), *sets), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while process.poll() is None and not last.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is not None:
        return _row("resume", False, "-", "training ended before the kill: " + _tail(process.stderr.read()))
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(last)["step"]
    for cmd in (_train_cmd("--output", str(run), "--resume"), _train_cmd("--output", str(straight), *sets)):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            return _row("resume", False, "-", _tail(done.stderr))
    a, b = (load_checkpoint(p / "checkpoints" / "last.pt")["models"]["generator"] for p in (run, straight))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    finite = all(bool(torch.isfinite(v).all()) for v in a.values() if v.is_floating_point())
    ok = finite and load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 30 and diff < 1e-2
    return _row("resume", ok, f"killed at {killed_at}, resumed to 30, max |w - straight| {diff:.1e}")


def _torchrun(device: Any, work: Path) -> dict[str, Any]:
    sets = [*_tiny_run(work, device), "--set", "train.steps=4"]
    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    notes = []
    for backend in backends:
        out = work / f"ddp_{backend}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "revgan_med", "train", "--output", str(out), *sets, "--set", f"train.dist_backend={backend}"]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode == 0 and (out / "checkpoints" / "last.pt").is_file():
            return _row("torchrun", True, f"2 ranks on {device}, {backend}", "; ".join(notes))
        notes.append(f"{backend} failed: {_tail(done.stderr)}")
    return _row("torchrun", False, "-", "; ".join(notes))


def _infer(device: Any, model: Any, shape: tuple[int, ...], work: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from revgan_med.data.phantom import make_phantom
    from revgan_med.inference_files import infer_path

    hu, affine = make_phantom(shape, seed=1)
    source = work / "synthetic_ct.nii.gz"
    from revgan_med.io import save_volume

    save_volume(np.asarray(hu, np.float32), affine, source)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    infer_path(model, source, work / "out.nii.gz")
    seconds = time.perf_counter() - start
    peak = ""
    if device.type == "cuda":
        peak = f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    passes = " (flip ensemble: 5 passes)" if model.ensemble else ""  # the checkpoint's infer.ensemble
    return _row("infer", True, f"{'x'.join(map(str, shape))}: {seconds:.1f} s{passes}{peak}")


def _small_gpu(device: Any, model: Any, work: Path) -> dict[str, Any]:
    """`infer` of the ``infer`` row's scan again with the GPU capped at half the peak that run needed:
    the automatic windows must shrink (a warning per retry) and the output stay finite, near the
    uncapped one (InstanceNorm sees other windows, so not equal)."""
    import warnings

    import numpy as np
    import torch

    from revgan_med.inference_files import infer_path
    from revgan_med.io import load_volume

    if device.type != "cuda":
        return _row("small-gpu", None, "-", "skipped: CUDA only")
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.max_memory_allocated(device) / 2
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            infer_path(model, work / "synthetic_ct.nii.gz", work / "capped.nii.gz")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    retries = sum("out of accelerator memory" in str(w.message) for w in caught)
    capped, full = (load_volume(work / name)[0] for name in ("capped.nii.gz", "out.nii.gz"))
    finite = bool(np.isfinite(capped).all())
    value = f"cap {cap / 2**30:.2f} GiB: {retries} retries, mean |capped - uncapped| "
    value += f"{float(np.abs(capped - full).mean()):.2f} HU"
    return _row("small-gpu", retries > 0 and finite, value, "" if finite else "non-finite output")


def _tail(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "no output"


def run_checks(
    *, device: str = "auto", pair: Path | None = None, amp_steps: int = 30,
    infer_shape: tuple[int, ...] = (512, 512, 300), skip: set[str] = frozenset(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the checks not in `skip`; return their rows and whether every row that ran passed."""
    import torch

    from revgan_med.runtime import resolve_device

    dev = resolve_device(device)
    work = Path(tempfile.mkdtemp(prefix="revgan_gpu_check_"))
    rows, model = [], None
    try:
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("memory", lambda: _memory(dev)),
            ("resume", lambda: _resume(dev, work / "resume")),
            ("torchrun", lambda: _torchrun(dev, work / "torchrun")),
        ]
        if "amp" not in skip or "infer" not in skip:
            row, model = _amp(dev, pair, amp_steps)
            rows.append(row if "amp" not in skip else _row("amp", None, "-", "skipped"))
        for name, check in steps:
            if name in skip:
                continue
            start = time.perf_counter()
            rows.append(check())
            if progress:
                progress(f"{name}: {time.perf_counter() - start:.0f} s")
        if "infer" not in skip:
            rows.append(_infer(dev, model, infer_shape, work))
            if "small-gpu" not in skip:
                rows.append(_small_gpu(dev, model, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"device": str(dev), "torch": torch.__version__, "rows": rows,
            "ok": all(r["ok"] is not False for r in rows)}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    """One line per check: PASS / FAIL / SKIP, the measured value and a note."""
    lines = [f"device check on {result['device']} (torch {result['torch']})",
             f"{'check':<10}{'result':<8}{'value':<58}note"]  # fmt: skip
    for r in result["rows"]:
        verdict = "SKIP" if r["ok"] is None else "PASS" if r["ok"] else "FAIL"
        lines.append(f"{r['check']:<10}{verdict:<8}{r['value']:<58}{r['note']}")
    lines.append("all checks passed" if result["ok"] else "SOME CHECKS FAILED")
    return "\n".join(lines)
