"""revgan-med: reversible 3D GANs for medical volume super-resolution and CT kernel conversion."""

__version__ = "0.1.0"
