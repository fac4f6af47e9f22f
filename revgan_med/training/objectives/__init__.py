"""Training objectives: small classes behind one training loop, registered by name in `OBJECTIVES`.

`base` holds the interface and the paired / unpaired objectives; `selfinverse` and `reggan` register
theirs when this package is imported, so `OBJECTIVES` always lists every objective.
"""

from __future__ import annotations

from revgan_med.training.objectives import reggan, selfinverse
from revgan_med.training.objectives.base import (
    OBJECTIVES,
    ImagePool,
    Objective,
    PairedObjective,
    UnpairedObjective,
    build_objective,
    gan_loss,
)
from revgan_med.training.objectives.reggan import RegGANCycleObjective, RegGANObjective
from revgan_med.training.objectives.selfinverse import SelfInverseObjective

__all__ = [
    "OBJECTIVES",
    "ImagePool",
    "Objective",
    "PairedObjective",
    "RegGANCycleObjective",
    "RegGANObjective",
    "SelfInverseObjective",
    "UnpairedObjective",
    "build_objective",
    "gan_loss",
    "reggan",
    "selfinverse",
]
