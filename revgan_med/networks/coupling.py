"""Additive coupling blocks and a reversible sequence that recomputes activations in backward.

Thesis ``000_*`` §2.3, eq. 8: split the channels into (x1, x2) and compute
``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``; the inverse is ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``.
Because every block is invertible, `ReversibleSequence` keeps only the sequence's final output for
backward and rebuilds each block's input from its output while walking the blocks in reverse, so
activation memory does not grow with depth. MONAI has no reversible blocks, hence our own autograd
Function; it replaces MemCNN, which frees its input in place (breaking ReLU inputs and skips), casts the
core to float32 under autocast and recomputes each block twice in backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

ParamGrads = list[tuple[Tensor, Tensor]]


def _vjp(fn: nn.Module, inp: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor, ParamGrads]:
    """Evaluate ``fn(inp)`` with a local graph and back-propagate `grad_out` through it at once.

    Returns the (detached) value, the gradient w.r.t. `inp` and ``(parameter, gradient)`` pairs; the local
    graph is freed before returning, so at most one branch's activations exist at a time.
    """
    with torch.enable_grad():
        leaf = inp.detach().requires_grad_()
        out = fn(leaf)
    params = [p for p in fn.parameters() if p.requires_grad]
    # the plain graph casts the gradient to the branch's (autocast) dtype at the addition; do the same
    grads = torch.autograd.grad(out, (leaf, *params), grad_out.to(out.dtype), materialize_grads=True)
    return out.detach(), grads[0], list(zip(params, grads[1:], strict=True))


class AdditiveCoupling(nn.Module):
    """Invertible block ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` over the two channel halves.

    Args:
        f: maps C/2 → C/2 channels without changing the spatial size (NN₁ in the thesis).
        g: maps C/2 → C/2 channels without changing the spatial size (NN₂).

    Input and output are ``(B, C, D, H, W)`` with C even. `f` and `g` must be deterministic (no dropout,
    no running statistics updated in training mode): backward evaluates them again.
    """

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.g = g

    @staticmethod
    def _halves(t: Tensor) -> tuple[Tensor, Tensor]:
        if t.shape[1] % 2:
            raise ValueError(f"AdditiveCoupling needs an even number of channels, got {t.shape[1]}")
        return t.chunk(2, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self._halves(x)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = self._halves(y)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=1)

    def reverse_step(
        self, output: Tensor, grad_output: Tensor, *, inverse: bool
    ) -> tuple[Tensor, Tensor, ParamGrads]:
        """Rebuild this block's input from its `output` and back-propagate `grad_output` through it.

        `inverse` says which direction produced `output`. Each branch is evaluated once, and its value
        serves both the reconstruction and the local gradient (two branch evaluations per block instead
        of four for inverse-then-recompute).

        Returns ``(input, grad w.r.t. input, [(parameter, grad), ...])``.
        """
        o1, o2 = self._halves(output)
        a, b = grad_output.chunk(2, dim=1)
        if not inverse:  # output (y1, y2) of y1 = x1 + f(x2), y2 = x2 + g(y1)
            gy1, d_y1, pg = _vjp(self.g, o1, b)
            x2 = o2 - gy1
            a_total = a + d_y1
            fx2, d_x2, pf = _vjp(self.f, x2, a_total)
            x1 = o1 - fx2
            return torch.cat([x1, x2], 1), torch.cat([a_total, b + d_x2], 1), pf + pg
        # output (x1, x2) of x2 = y2 - g(y1), x1 = y1 - f(x2)
        fx2, d_x2, pf = _vjp(self.f, o2, -a)
        y1 = o1 + fx2
        b_total = b + d_x2
        gy1, d_y1, pg = _vjp(self.g, y1, -b_total)
        y2 = o2 + gy1
        return torch.cat([y1, y2], 1), torch.cat([a + d_y1, b_total], 1), pf + pg


def _generic_reverse_step(
    block: nn.Module, output: Tensor, grad_output: Tensor, *, inverse: bool
) -> tuple[Tensor, Tensor, ParamGrads]:
    """`reverse_step` for any block with `forward` and `inverse`: invert, then recompute with grad."""
    run, undo = (block.inverse, block.forward) if inverse else (block.forward, block.inverse)
    with torch.no_grad():
        inp = undo(output)
    with torch.enable_grad():
        leaf = inp.detach().requires_grad_()
        out = run(leaf)
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, (leaf, *params), grad_output, materialize_grads=True)
    return inp, grads[0], list(zip(params, grads[1:], strict=True))


class _ReversibleFunction(torch.autograd.Function):
    """Run all blocks without a graph, keep only the final output; rebuild inputs in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: Sequence[nn.Module], inverse: bool, *params: Tensor) -> Tensor:
        device_type = x.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type)
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), autocast_dtype)
        ctx.blocks = blocks
        ctx.inverse = inverse
        ctx.params = params  # parameters, not activations: referenced, not saved
        y = x  # rebinding `y` frees each intermediate output as soon as the next block has run
        for block in reversed(blocks) if inverse else blocks:
            y = block.inverse(y) if inverse else block(y)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        y = y.detach()  # never modify the saved output: several backward calls may share it
        device_type, enabled, dtype = ctx.autocast
        param_grads: dict[int, Tensor] = {}
        # recompute under the forward's autocast state, so the branches see the same dtypes
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for block in ctx.blocks if ctx.inverse else reversed(ctx.blocks):
                step = getattr(block, "reverse_step", None)
                if step is None:
                    y, grad_y, pairs = _generic_reverse_step(block, y, grad_y, inverse=ctx.inverse)
                else:
                    y, grad_y, pairs = step(y, grad_y, inverse=ctx.inverse)
                for p, g in pairs:
                    param_grads[id(p)] = param_grads[id(p)] + g if id(p) in param_grads else g
        grad_x = grad_y if ctx.needs_input_grad[0] else None
        return (grad_x, None, None, *(param_grads.get(id(p)) for p in ctx.params))


class ReversibleSequence(nn.Module):
    """Invertible blocks run in order; `inverse` runs their inverses in reverse order.

    Args:
        blocks: invertible modules with ``forward`` and ``inverse`` (e.g. `AdditiveCoupling`); a block may
            also define ``reverse_step`` (see `AdditiveCoupling.reverse_step`) for a cheaper backward.
        memory_saving: True keeps no activation inside the sequence for backward (each block's input is
            rebuilt from its output); False is plain autograd. Parameters and state-dict keys are the same.

    Input and output ``(B, C, D, H, W)``. The input tensor is never modified, so it may be a ReLU output or
    be reused elsewhere (a skip connection). Under ``torch.autocast`` the blocks run in the autocast dtype,
    in forward and in the backward recomputation alike.
    """

    def __init__(self, blocks: Iterable[nn.Module], *, memory_saving: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.memory_saving = memory_saving

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, inverse=False)

    def inverse(self, y: Tensor) -> Tensor:
        return self._run(y, inverse=True)

    def _run(self, x: Tensor, *, inverse: bool) -> Tensor:
        params = [p for p in self.blocks.parameters() if p.requires_grad]
        needs_graph = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if self.memory_saving and needs_graph and len(self.blocks) > 0:
            return _ReversibleFunction.apply(x, self.blocks, inverse, *params)
        for block in reversed(self.blocks) if inverse else self.blocks:
            x = block.inverse(x) if inverse else block(x)
        return x
