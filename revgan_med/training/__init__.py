"""Training: objectives, the training loop, checkpoints and distributed helpers."""
