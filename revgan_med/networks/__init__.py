"""Networks: the reversible core, RevGAN generators and PatchGAN discriminators, built by name."""

from __future__ import annotations

from revgan_med.networks.coupling import AdditiveCoupling, ReversibleSequence
from revgan_med.networks.discriminators import build_discriminator, discriminator_names
from revgan_med.networks.generators import Generator, build_generator, generator_names, init_weights

__all__ = [
    "AdditiveCoupling",
    "Generator",
    "ReversibleSequence",
    "build_discriminator",
    "build_generator",
    "discriminator_names",
    "generator_names",
    "init_weights",
]
