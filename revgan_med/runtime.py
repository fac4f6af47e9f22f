"""Where and in what precision the networks run: device choice and the one mixed-precision policy.

Training and inference share these, so a model trained with ``train.amp`` runs its learned body in
the same dtype at ``infer --amp``. Low precision is for the learned convolutional body only: the
identity/residual path, the linear paths, the domain gate and warp grids run in `float32_island`
(autocast off, TF32 off), because a 4,095 HU window mapped to [-1, 1] leaves a 10-bit mantissa
(fp16, TF32) or 8-bit (bf16) a resolution of several HU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """Any torch device string (``cpu``, ``cuda``, ``cuda:1``, ...); ``auto``/None → this rank's GPU or CPU.

    A bare ``cuda`` means GPU `local_rank` (modulo the GPUs present), so torchrun ranks spread. Raises
    `ValueError` with one line when the string is not a device or the device is not available here.
    """
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. auto, cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine")
        if resolved.index is None:
            return torch.device("cuda", local_rank % count)
        if resolved.index >= count:
            raise ValueError(f"device {str(device)!r} requested but only {count} CUDA device(s) are visible")
    elif resolved.type not in ("cpu", "meta"):
        backend = getattr(torch, resolved.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"device {str(device)!r} requested but it is not available on this machine")
    return resolved


def amp_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """The autocast dtype for `device`, None for full precision (``amp=False`` or no low-precision path).

    bf16 where it is native: CUDA compute capability ≥ 8 (Ampere and later; pre-Ampere GPUs only
    emulate it, which `torch.cuda.is_bf16_supported` counts by default) and the CPU. Older GPUs get
    fp16, which needs a `GradScaler` in training (`needs_grad_scaler`).
    """
    if not amp:
        return None
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return None


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has float32's exponent range."""
    return dtype == torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in `dtype` (from `amp_dtype`), or nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def float32_island(device_type: str) -> Iterator[None]:
    """Run the enclosed ops in true float32: autocast off, TF32 off for cuDNN convolutions and matmuls.

    Inputs coming from an autocast region must be cast with ``.float()`` by the caller.
    """
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    off = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else None
    try:
        with off or contextlib.nullcontext():
            yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved
