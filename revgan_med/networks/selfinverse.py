"""The self-inverse generator (``002_*`` §4, "one2one"): ONE function f with f = f⁻¹ for both directions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from revgan_med.networks.generators import Generator, SeparateCores
from revgan_med.networks.linear import DomainGate


class SelfInverseGenerator(Generator):
    """One function f for both directions: ``inverse(v) = forward(v) = dec ∘ core ∘ enc (v)``.

    Built from a `Generator` by sharing modules: ``enc_y`` IS ``enc_x`` and ``dec_x`` IS ``dec_y`` (and,
    for the plain baselines, the Y → X core IS the X → Y core), so `parameters()` holds one encoder, one
    core and one decoder. Compared with the generator of the ``paired`` objective, which needs both
    directions: exactly half the parameters for the plain baselines (one network instead of two, as the
    paper's one2one vs two pix2pix models); for the reversible generators, whose core is already shared,
    the second encoder/decoder pair is saved. The state dict keeps the usual keys (shared tensors appear
    under both names).

    With linear paths (``model.linear_kernel``) f keeps BOTH, X → Y (``lin_y``) and Y → X (``lin_x``):
    no one linear filter both sharpens and smooths. A `DomainGate` (``domain``) picks one per window
    from the input's texture, so f stays one function of its input; its bands follow the paths' kernel.
    Both paths and the gate are fitted at the start (``train.linear_fit_batches``), not trained: the
    shared network's compromise between the directions pulls trained paths off their fit (on the B/L
    pair, trained paths cost 0.6 dB L → B in 400 steps).
    """

    def __init__(self, *, domain: DomainGate | None = None, **parts: Any) -> None:
        super().__init__(**parts)
        self.domain = domain

    def inverse(self, y: Tensor) -> Tensor:
        return self.forward(y)

    def linear_part(self, v: Tensor, *, inverse: bool) -> Tensor | float:
        if self.domain is None:
            return 0.0
        return torch.where(self.domain(v), self.lin_y(v), self.lin_x(v))

    @classmethod
    def from_generator(cls, generator: Generator) -> SelfInverseGenerator:
        """Share `generator`'s X-side encoder, Y-side decoder and forward core between both directions."""
        if not isinstance(generator, Generator):
            raise ValueError(f"self-inverse needs a revgan_med Generator, got {type(generator).__name__}")
        core = generator.core
        if isinstance(core, SeparateCores):
            core.yx = core.xy
        paths = generator.lin_x, generator.lin_y
        for path in paths if generator.lin_y is not None else ():
            path.requires_grad_(False)
        inverse = cls(
            enc_x=generator.enc_x,
            enc_y=generator.enc_x,
            core=core,
            dec_x=generator.dec_y,
            dec_y=generator.dec_y,
            multiple=generator.multiple,
            min_size=generator.min_size,
            residual=generator.residual,
            lin_x=generator.lin_x,
            lin_y=generator.lin_y,
            domain=None if generator.lin_y is None else DomainGate(generator.lin_y.kernel_size),
        )
        inverse.gate = generator.gate  # the correction's scale (`build_generator`), shared too
        return inverse
