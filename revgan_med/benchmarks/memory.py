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

HELP = "activation memory, peak memory and step time vs. depth: memory-saving vs plain vs MemCNN"
MIB = 2.0**20
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
    variants = [v for v in VARIANTS if v != "memcnn" or _memcnn_available()]
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


def _memcnn_available() -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MemCNN's deprecated torch.cuda.amp decorators
        try:
            import memcnn  # noqa: F401
        except ImportError:
            return False
    return True


def _in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "revgan_med.benchmarks.memory", json.dumps(spec)],
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


def saved_activation_bytes(fn: Callable[[], Any], *, exclude: Any = ()) -> tuple[Any, int]:
    """Call `fn` and return ``(its result, bytes of the unique storages autograd saved for backward)``.

    Storages of the tensors in `exclude` (the parameters) are not counted; a storage saved twice counts once.
    """
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _memcnn_core(blocks: Any) -> Any:
    """MemCNN's wrappers around our coupling branches, in a module with our core's forward/inverse."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import memcnn
    from torch import nn

    class MemcnnCore(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=b.f, Gm=b.g)) for b in blocks
            )

        def forward(self, x: Any) -> Any:
            x = x.clone()  # MemCNN frees its input's storage; the encoder's ReLU still needs it
            for block in self.blocks:
                x = block(x)
            return x

    return MemcnnCore()


def _peak_tracker(device: Any) -> tuple[Callable[[], None], Callable[[], float]]:
    """(reset, peak MiB beyond the memory in use at reset) for the device."""
    import resource

    import torch

    if device.type == "cuda":
        base = {}

        def reset() -> None:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base["v"] = torch.cuda.memory_allocated(device)

        return reset, lambda: (torch.cuda.max_memory_allocated(device) - base["v"]) / MIB
    base_rss = {}

    def reset_cpu() -> None:
        base_rss["v"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # ru_maxrss is in KiB on Linux
    return reset_cpu, lambda: (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss["v"]) / 1024.0


def _generator(spec: dict[str, Any], *, memory_saving: bool) -> Any:
    """The benchmarked generator of `spec` (1 → 1 channel, thesis initialisation)."""
    from revgan_med.networks import build_generator

    return build_generator(spec["generator"], in_channels=1, out_channels=1, width=spec["width"],
                           depth=spec["depth"], memory_saving=memory_saving)


def _step(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured G+D training step (+ `repeats` timed ones) of a variant at a depth."""
    import time

    import torch
    import torch.nn.functional as F

    from revgan_med.networks import build_discriminator
    from revgan_med.runtime import resolve_device

    device = resolve_device(spec["device"])
    torch.manual_seed(0)
    gen = _generator(spec, memory_saving=spec["variant"] == "memory-saving")
    if spec["variant"] == "memcnn":
        gen.core = _memcnn_core(gen.core.blocks)
    gen = gen.to(device)
    # PatchGAN needs sides >= 24; tiny smoke-test patches run the generator alone
    disc = None
    if spec["size"] >= 24:
        disc = build_discriminator(in_channels=1, width=spec["disc_width"]).to(device)
    shape = (1, 1, spec["size"], spec["size"], spec["size"])
    x, target = torch.randn(shape, device=device), torch.rand(shape, device=device)
    params = list(gen.parameters()) + (list(disc.parameters()) if disc is not None else [])

    def generator_forward() -> tuple[torch.Tensor, torch.Tensor]:
        fake = gen(x)
        loss = F.l1_loss(fake, target)
        if disc is not None:
            logits = disc(fake)
            loss = loss + F.mse_loss(logits, torch.ones_like(logits))
        return loss, fake

    def step(measure: bool) -> tuple[int, float]:
        start = time.perf_counter()
        if measure:
            (loss, fake), saved = saved_activation_bytes(generator_forward, exclude=params)
        else:
            (loss, fake), saved = generator_forward(), 0
        loss.backward()
        if disc is not None:
            _discriminator_backward(disc, fake.detach(), target)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return saved, time.perf_counter() - start

    reset, peak = _peak_tracker(device)
    reset()
    saved, first = step(measure=True)
    peak_mib = peak()
    times = [step(measure=False)[1] for _ in range(spec["repeats"])] or [first]
    return {
        "params_mib": sum(p.numel() * p.element_size() for p in gen.parameters()) / MIB,
        "saved_mib": saved / MIB,
        "peak_mib": peak_mib,
        "step_s": min(times),
    }


def _discriminator_backward(disc: Any, fake: Any, real: Any) -> None:
    import torch
    import torch.nn.functional as F

    fake_logits, real_logits = disc(fake), disc(real)
    loss = F.mse_loss(fake_logits, torch.zeros_like(fake_logits))
    (loss + F.mse_loss(real_logits, torch.ones_like(real_logits))).backward()


def _check(spec: dict[str, Any]) -> dict[str, Any]:
    """Invertibility of the core and gradient parity memory-saving vs plain, random non-zero weights.

    Float32 parity is limited by float32 itself: a ReLU whose input is within rounding of zero can switch
    between any two float32 computations and move the weight gradients by ~1e-4 relative at 64³. So the
    check also reports that floor (plain float32 vs plain float64), the same comparison in float64 (the
    reconstruction's own error) and MemCNN vs plain on the same blocks (same arithmetic, same floor).
    """
    import torch

    from revgan_med.networks import init_weights
    from revgan_med.runtime import resolve_device

    device = resolve_device(spec["device"])
    torch.manual_seed(0)

    def core(saving: bool, dtype: torch.dtype) -> Any:
        return _generator(spec, memory_saving=saving).core.to(device, dtype)

    reference = core(True, torch.float32)
    init_weights(reference, zero_last=False)
    channels = reference.blocks[0].f[0].in_channels * 2
    side = spec["size"] // (2 if "resnet" in spec["generator"] else 1)
    x = torch.randn(1, channels, side, side, side, device=device)
    with torch.no_grad():
        inverse_error = (reference.inverse(reference(x)) - x).abs().max().item()
    weight = torch.randn_like(x)

    def run(module: Any, dtype: torch.dtype, owner: Any = None) -> tuple[Any, Any, Any]:
        """(output, input gradient, parameter gradients in `owner`'s order) of ``sum(weight · module(x))``."""
        leaf = x.to(dtype).clone().requires_grad_()
        y = module(leaf)
        (y * weight.to(dtype)).sum().backward()
        params = list((owner or module).parameters())
        grads = torch.cat([p.grad.flatten() for p in params]).double()
        for p in params:
            p.grad = None
        return y.detach().double(), leaf.grad.double(), grads

    def rel(a: Any, b: Any) -> float:
        return ((a - b).norm() / b.norm()).item()

    out: dict[str, Any] = {"inverse_error": inverse_error}
    results = {}
    for dtype in (torch.float32, torch.float64):
        for saving in (True, False):
            module = core(saving, dtype)
            module.load_state_dict(reference.state_dict())
            results[(saving, dtype)] = run(module, dtype)
    (ya, gxa, gpa), (yb, gxb, gpb) = results[(True, torch.float32)], results[(False, torch.float32)]
    out.update(
        output_diff=(ya - yb).abs().max().item(),
        param_grad_rel=rel(gpa, gpb),
        input_grad_rel=rel(gxa, gxb),
        param_grad_rel_float64=rel(results[(True, torch.float64)][2], results[(False, torch.float64)][2]),
        float32_floor=rel(gpb, results[(False, torch.float64)][2]),
    )
    if _memcnn_available():
        plain = core(False, torch.float32)
        plain.load_state_dict(reference.state_dict())
        # MemCNN registers Gm before Fm: read the gradients in our parameter order
        out["memcnn_param_grad_rel"] = rel(run(_memcnn_core(plain.blocks), torch.float32, plain)[2], gpb)
    return out


def _worker(spec: dict[str, Any]) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    result = _step(spec) if spec["task"] == "step" else _check(spec)
    print(json.dumps(result))


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
