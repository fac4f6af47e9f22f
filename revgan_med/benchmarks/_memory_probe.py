"""One run of the memory benchmark in a fresh process (`python -m revgan_med.benchmarks._memory_probe SPEC`).

A training step of one (variant, depth) or the core check, as `memory.py` describes; prints one JSON line.
The leading underscore keeps it out of the `revgan-med benchmark` subcommands.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

MIB = 2.0**20


def memcnn_available() -> bool:
    """Whether MemCNN (the comparison variant) is installed."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MemCNN's deprecated torch.cuda.amp decorators
        try:
            import memcnn  # noqa: F401
        except ImportError:
            return False
    return True


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
    if memcnn_available():
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
