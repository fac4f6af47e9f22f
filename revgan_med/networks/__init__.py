"""Networks: the reversible core, RevGAN generators (with their linear paths and the self-inverse
variant) and PatchGAN discriminators, built by name."""

from __future__ import annotations

from revgan_med.networks.coupling import AdditiveCoupling, ReversibleSequence
from revgan_med.networks.discriminators import build_discriminator, discriminator_names
from revgan_med.networks.generators import Generator, build_generator, generator_names, init_weights
from revgan_med.networks.linear import DomainGate, LinearPath
from revgan_med.networks.selfinverse import SelfInverseGenerator

__all__ = [
    "AdditiveCoupling",
    "DomainGate",
    "Generator",
    "LinearPath",
    "ReversibleSequence",
    "SelfInverseGenerator",
    "build_discriminator",
    "build_generator",
    "discriminator_names",
    "generator_names",
    "init_weights",
]
