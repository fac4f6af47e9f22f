"""Memory benchmark (thesis ``000_*`` Table 7, in 3D): activation memory and step time vs. core depth.

For each depth, one generator + discriminator training step (forward, L1 + LSGAN loss, backward of both)
runs in a fresh subprocess, so earlier runs cannot pollute the peak, for three variants of the same
generator: ``memory-saving`` (our reversible core), ``plain`` (same parameters, plain autograd) and
``memcnn`` (MemCNN's ``InvertibleModuleWrapper`` around the same coupling branches, when installed).
Reported per run: parameter MiB of the generator, activation MiB kept for backward by the generator step
(unique storages seen by ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded), peak
memory beyond the baseline after model creation (CPU: ``ru_maxrss``; CUDA: ``max_memory_allocated``)
and the time of one step. A separate run checks the core itself: invertibility error with random
non-zero weights and the gradient difference memory-saving vs plain.

Examples:
  revgan-med benchmark memory
  revgan-med benchmark memory --depths 2,8,32 --size 48 --width 16 --json memory.json
  revgan-med benchmark memory --device cuda --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from revgan_med.benchmarks import write_json
from revgan_med.benchmarks._memory_probe import memcnn_available

HELP = "activation memory, peak memory and step time vs. depth: memory-saving vs plain vs MemCNN"
VARIANTS = ("memory-saving", "plain", "memcnn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", default="2,4,8,16,32", help="comma-separated core depths (%(default)s)")
    parser.add_argument("--size", type=int, default=64, help="cubic patch side in voxels (%(default)s)")
    parser.add_argument("--width", type=int, default=32, help="generator width K (%(default)s)")
    parser.add_argument("--generator", default="rev_srcnn3d", help="reversible generator (%(default)s)")
    parser.add_argument("--disc-width", type=int, default=32, help="PatchGAN width (%(default)s)")
    parser.add_argument(
        "--check-depth",
        type=int,
        default=16,
        help="core depth of the invertibility / gradient check (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed steps after the measuring step; 0 times the measuring step (default: 1)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0: torch default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    try:
        depths = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"--depths: expected comma-separated integers, got {args.depths!r}") from None
    result = run_benchmark(
        depths=depths,
        size=args.size,
        width=args.width,
        generator=args.generator,
        disc_width=args.disc_width,
        check_depth=args.check_depth,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(format_table(result))
    write_json(args.json, result)
    return 0 if not result["failures"] else 1


def run_benchmark(
    *,
    depths: list[int],
    size: int,
    width: int,
    generator: str = "rev_srcnn3d",
    disc_width: int = 32,
    check_depth: int = 16,
    repeats: int = 1,
    threads: int = 0,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every (variant, depth) in a fresh subprocess plus the core check; return plain data."""
    from revgan_med.runtime import resolve_device

    if not depths or min(depths) < 1 or size < 4 or width < 2 or width % 2 or repeats < 0:
        raise ValueError("benchmark memory: need depths >= 1, size >= 4, an even width >= 2, repeats >= 0")
    common = {
        "size": size,
        "width": width,
        "generator": generator,
        "disc_width": disc_width,
        "threads": threads,
        "device": str(resolve_device(device)),
    }
    variants = [v for v in VARIANTS if v != "memcnn" or memcnn_available()]
    runs, failures = [], []
    for variant in variants:
        for depth in depths:
            if progress:
                progress(f"benchmark memory: {variant} depth {depth}")
            spec = {**common, "task": "step", "variant": variant, "depth": depth, "repeats": repeats}
            try:
                runs.append({"variant": variant, "depth": depth, **_in_subprocess(spec)})
            except RuntimeError as exc:
                failures.append(f"{variant} depth {depth}: {exc}")
    check: dict[str, Any] = {}
    if check_depth > 0:
        if progress:
            progress(f"benchmark memory: core check at depth {check_depth}")
        try:
            check = _in_subprocess({**common, "task": "check", "depth": check_depth})
        except RuntimeError as exc:
            failures.append(f"core check: {exc}")
    return {
        "settings": {**common, "depths": depths, "check_depth": check_depth, "repeats": repeats},
        "runs": runs,
        "check": check,
        "ratios": _ratios(runs, depths),
        "failures": failures,
    }


def _in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "revgan_med.benchmarks._memory_probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"]
        raise RuntimeError(lines[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(runs: list[dict[str, Any]], depths: list[int]) -> dict[str, Any]:
    """The ratios the targets name: growth with depth per variant, and time vs plain / MemCNN per depth."""
    by = {(r["variant"], r["depth"]): r for r in runs}
    lo, hi = min(depths), max(depths)
    peak_hi = 16 if 16 in depths else hi
    out: dict[str, Any] = {"depth_low": lo, "depth_high": hi, "peak_depth_high": peak_hi}
    for variant in VARIANTS:
        a, b, c = by.get((variant, lo)), by.get((variant, hi)), by.get((variant, peak_hi))
        if a and b and c:
            out[variant] = {
                "saved": b["saved_mib"] / max(a["saved_mib"], 1e-9),
                "peak": c["peak_mib"] / max(a["peak_mib"], 1e-9),
            }
    for other in ("plain", "memcnn"):
        out[f"time_vs_{other}"] = {
            d: by[("memory-saving", d)]["step_s"] / by[(other, d)]["step_s"]
            for d in depths
            if ("memory-saving", d) in by and (other, d) in by
        }
    return out


def format_table(result: dict[str, Any]) -> str:
    """The Table-7-style text table plus the check and the target ratios."""
    s = result["settings"]
    lines = [
        f"Memory benchmark: {s['generator']}, {s['size']}³ patch, width {s['width']}, "
        + (f"PatchGAN width {s['disc_width']}" if s["size"] >= 24 else "no PatchGAN (patch < 24³)")
        + f", device {s['device']}; one training step (fwd+bwd)",
        f"{'variant':<14}{'depth':>6}{'params MiB':>12}{'saved MiB':>11}{'peak MiB':>10}{'step s':>9}"
        f"{'vs plain':>10}{'vs memcnn':>11}",
    ]
    ratios = result["ratios"]
    for r in result["runs"]:
        vs = [
            ratios[f"time_vs_{o}"].get(r["depth"]) if r["variant"] == "memory-saving" else None
            for o in ("plain", "memcnn")
        ]
        cols = "".join(
            f"{v:>{w}.2f}" if v is not None else " " * w for v, w in zip(vs, (10, 11), strict=True)
        )
        lines.append(
            f"{r['variant']:<14}{r['depth']:>6}{r['params_mib']:>12.2f}{r['saved_mib']:>11.1f}"
            f"{r['peak_mib']:>10.1f}{r['step_s']:>9.2f}{cols}"
        )
    check = result["check"]
    if check:
        memcnn = check.get("memcnn_param_grad_rel")
        lines += [
            f"core check (depth {s['check_depth']}, random non-zero weights, float32): "
            f"max|C⁻¹(C(x)) − x| = {check['inverse_error']:.2e}; memory-saving vs plain: "
            f"output {check['output_diff']:.2e}, param-grad rel. {check['param_grad_rel']:.2e}, "
            f"input-grad rel. {check['input_grad_rel']:.2e}",
            f"  param-grad rel. memory-saving vs plain in float64: {check['param_grad_rel_float64']:.2e}; "
            f"float32 floor (plain float32 vs float64): {check['float32_floor']:.2e}"
            + (f"; MemCNN vs plain, float32: {memcnn:.2e}" if memcnn is not None else ""),
        ]
    lo, hi, ph = ratios["depth_low"], ratios["depth_high"], ratios["peak_depth_high"]
    for variant in VARIANTS:
        if variant in ratios:
            lines.append(
                f"{variant}: saved depth {hi}/{lo} = {ratios[variant]['saved']:.2f}, "
                f"peak depth {ph}/{lo} = {ratios[variant]['peak']:.2f}"
            )
    lines.extend(f"FAILED {f}" for f in result["failures"])
    return "\n".join(lines)
