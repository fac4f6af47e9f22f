"""The training loop: schedule → step → log → validate → checkpoint, for every objective.

`train(config, output_dir)` is what ``revgan-med train`` runs. One iteration is one generator step
and one discriminator step (`revgan_med.training.objectives`) on one batch of patches. Adam
(lr 2e-4, betas (0.5, 0.999)) with a constant learning rate that decays linearly to 0 from
``train.decay_start`` to ``train.steps`` (thesis ``000_*`` §4.3). Runs on CPU or CUDA, with bf16/fp16
autocast (``train.amp``), and data-parallel under torchrun (`revgan_med.training.distributed`).

Everything that decides the next step lives in ``checkpoints/last.pt``: weights, optimiser, schedule,
GradScaler, RNG states, the data position (epoch and batches consumed) and the objective's own state
(image pools). Resuming from it continues the run exactly as if it had not stopped (on the CPU, bit
for bit); it is written atomically, so it is whole even when the process is killed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from revgan_med.checkpoints import build_generator_from_config, load_checkpoint, save_checkpoint
from revgan_med.config import Config, ConfigError, save_config
from revgan_med.data.datasets import PatchDataset, load_datalist, shard_cases
from revgan_med.data.transforms import intensity_for_task
from revgan_med.networks import build_discriminator
from revgan_med.runtime import amp_dtype as runtime_amp_dtype
from revgan_med.runtime import autocast, needs_grad_scaler
from revgan_med.tasks import TASK_CHANNELS, TaskSpec, evaluation_window, training_spec
from revgan_med.training.averaging import WeightAverage, training_weights
from revgan_med.training.distributed import (
    DistributedContext,
    ResumableDistributedSampler,
    all_reduce_mean,
    average_gradients,
    barrier,
    broadcast_module,
    init_distributed,
    shutdown_distributed,
)
from revgan_med.training.guards import (
    check_resume,
    fresh_run_cleanup,
    require_finite_losses,
    require_finite_weights,
)
from revgan_med.training.holdout import holdout_config
from revgan_med.training.logging import RunLogger
from revgan_med.training.objectives import OBJECTIVES, Objective, build_objective
from revgan_med.training.rng import capture_rng_state, restore_rng_state
from revgan_med.training.validation import ValidationSet, fallbacks


@dataclass
class TrainState:
    """Progress of a run; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed
    best_margin: float = -math.inf  # validation PSNR over the baseline's (dB) of best.pt


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA); deterministic kernels on the CPU, where they are cheap."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


def lr_factor(step: int, *, steps: int, decay_start: int) -> float:
    """Learning-rate multiplier after `step` optimiser steps: 1, then linear to 0 at `steps`."""
    if step < decay_start:
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - decay_start))


def build_training_objective(config: Config) -> Objective:
    """The objective of `config` with its generator and discriminators (weights N(0, 0.02) per §4.3
    are the networks' own initialisation)."""
    channels = TASK_CHANNELS[config.task]
    fitted_paths = config.objective == "self-inverse" and config.model.linear_kernel
    if fitted_paths and config.train.linear_fit_batches < 1:
        raise ConfigError(
            "objective self-inverse with model.linear_kernel needs train.linear_fit_batches >= 1: its "
            "linear paths and domain gate are fitted at the start, not trained"
        )
    generator = build_generator_from_config(config)
    needed = OBJECTIVES.get(config.objective).discriminator_channels(channels, config.loss)
    discriminators = {
        role: build_discriminator(
            "patchgan3d", in_channels=c, width=config.model.disc_width, patch_size=config.data.patch_size
        )
        for role, c in needed.items()
    }
    objective = build_objective(
        config.objective, generator=generator, discriminators=discriminators, loss=config.loss
    )
    objective.pixel_bounds = metric_bounds(config) if config.loss.window == "metric" else None
    return objective


def metric_bounds(config: Config) -> tuple[float, float]:
    """The CT task's metric window (`evaluation_window`) in the units the network sees."""
    spec = TaskSpec.from_config(config)
    window = evaluation_window(spec.task, model_window=spec.window)
    lo, hi = intensity_for_task(spec.task, spec.window).normalize(np.asarray(window, dtype=np.float32))
    return float(lo), float(hi)


def update(
    objective: Objective,
    phase: str,
    batch: dict[str, torch.Tensor],
    *,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None = None,
    context: DistributedContext,
) -> dict[str, float]:
    """One optimisation phase, ``"generator"`` or ``"discriminator"``: losses, backward, averaged
    gradients, optimiser steps of that phase's roles. Returns the losses as floats (the total as
    ``g_loss`` / ``d_loss``)."""
    modules = objective.modules_by_role()
    discriminators = objective.discriminator_roles()
    roles = objective.generator_roles() if phase == "generator" else discriminators
    for role in discriminators:  # frozen in the generator phase: its GAN loss must not train them
        modules[role].requires_grad_(phase == "discriminator")
    for role in roles:
        optimizers[role].zero_grad(set_to_none=True)
    step = objective.generator_step if phase == "generator" else objective.discriminator_step
    with autocast(context.device, amp_dtype):
        losses = step(batch)
    scaler.scale(losses["loss"]).backward()
    average_gradients([p for role in roles for p in modules[role].parameters()], context)
    for role in roles:
        scaler.step(optimizers[role])
    total = "g_loss" if phase == "generator" else "d_loss"
    return {total if name == "loss" else name: float(value.detach()) for name, value in losses.items()}


def train_step(
    objective: Objective,
    batch: dict[str, torch.Tensor],
    *,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    context: DistributedContext,
) -> dict[str, float]:
    """One generator phase, then one discriminator phase (when there are discriminators)."""
    kwargs = {"optimizers": optimizers, "scaler": scaler, "amp_dtype": amp_dtype, "context": context}
    losses = update(objective, "generator", batch, **kwargs)
    if objective.discriminator_roles():
        losses.update(update(objective, "discriminator", batch, **kwargs))
    scaler.update()
    return losses


def _batches(
    dataset: Dataset, loader: DataLoader, sampler: ResumableDistributedSampler, state: TrainState
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from the state's data position; advances ``state.epoch``/``batches_in_epoch``."""
    base_seed = int(loader.generator.initial_seed())
    while True:
        # worker seeds depend only on (seed, rank, epoch), so a resumed epoch gets the same workers
        loader.generator.manual_seed(base_seed + 7919 * state.epoch)
        sampler.set_epoch(state.epoch, start=state.batches_in_epoch * loader.batch_size)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state.epoch)
        for batch in loader:
            state.batches_in_epoch += 1
            yield batch
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The images of a loader batch on `device` (metadata dropped)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("image", "target", "body")}


def _loader(dataset: Dataset, config: Config, context: DistributedContext) -> tuple[DataLoader, Any]:
    """Batches of this rank's own dataset (`_training_dataset` holds only its share of the cases)."""
    if len(dataset) < config.train.batch_size:
        raise ValueError(
            f"{config.data.datalist}: {len(dataset)} training samples are fewer than one batch per rank"
        )
    alone = dataclasses.replace(context, rank=0, world_size=1, owns_group=False)
    sampler = ResumableDistributedSampler(dataset, context=alone, seed=config.train.seed + context.rank)
    workers = config.data.num_workers
    loader = DataLoader(
        dataset,
        batch_size=config.train.batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=context.device.type == "cuda",
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(config.train.seed + context.rank),
        persistent_workers=workers > 0,  # no re-fork per epoch; the epoch reaches workers in shared memory
    )
    return loader, sampler


def _training_dataset(config: Config, intensity: Any, context: DistributedContext) -> Dataset:
    """This rank's share of the training cases, cached in memory (RAM per process, not × ranks)."""
    data = config.data
    cases = shard_cases(load_datalist(data.datalist, "training"), context.rank, context.world_size)
    return PatchDataset(
        cases,
        task=config.task,
        intensity_or_window=intensity,
        patch_size=data.patch_size,
        samples_per_volume=data.samples_per_volume,
        foreground_fraction=data.foreground_fraction,
        factors=data.factors,
        upsample=data.upsample,
        paired=OBJECTIVES.get(config.objective).paired_data,
        body=config.loss.region == "body",
        augment=data.augment,
        seed=config.train.seed + 7919 * context.rank,  # ranks sharing a case draw other patches
        num_workers=data.num_workers,
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # DataLoader derives it from its generator and the worker id
    np.random.seed(seed)
    random.seed(seed)


class _Checkpointer:
    """Builds checkpoint payloads and restores runs from them."""

    def __init__(
        self,
        config: Config,
        spec: TaskSpec,
        objective: Objective,
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
        scaler: torch.amp.GradScaler,
        intensity: Any,
    ) -> None:
        self.config, self.spec, self.objective, self.intensity = config, spec, objective, intensity
        self.optimizers, self.schedulers, self.scaler = optimizers, schedulers, scaler
        self.average: WeightAverage | None = None  # train.ema_decay > 0: `start_average`
        self._saved_average: tuple[dict, int] | None = None  # a resumed run's average and its count

    def start_average(self, decay: float) -> None:
        """Average the generator's weights from now on (or continue the resumed run's average)."""
        self.average = WeightAverage(self.objective.generator, decay)
        if self._saved_average is not None:
            self.average.restore(*self._saved_average)

    def generator(self) -> torch.nn.Module:
        """The generator that is validated and saved for inference: the average when there is one."""
        return self.average.module if self.average is not None else self.objective.generator

    def payload(self, state: TrainState) -> dict[str, Any]:
        require_finite_weights(self.objective.modules_by_role(), state.step)
        models = {role: m.state_dict() for role, m in self.objective.modules_by_role().items()}
        averaged = {}
        if self.average is not None:
            models["generator"] = self.average.module.state_dict()
            averaged = self.average.checkpoint_fields(self.objective.generator)
        return {
            "config": self.config.to_dict(),
            "spec": self.spec.to_dict(),
            "intensity": self.intensity.to_dict(),
            "task": self.config.task,
            "objective": self.config.objective,
            "step": state.step,
            "best_metric": {"name": "psnr_margin", "value": state.best_margin},
            "data_position": {"epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch},
            "models": models,
            **averaged,
            "objective_state": self.objective.extra_state(),
            "optimizers": {role: opt.state_dict() for role, opt in self.optimizers.items()},
            "schedulers": {role: s.state_dict() for role, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
        }

    def restore(self, path: Path, context: DistributedContext) -> TrainState:
        # to the CPU: RNG keys must stay CPU tensors and the image pools live there; load_state_dict
        # copies weights and optimiser state onto the modules' device
        payload = load_checkpoint(path, map_location="cpu")
        for role, module in self.objective.modules_by_role().items():
            module.load_state_dict(training_weights(payload, role))
        if "ema_updates" in payload:
            self._saved_average = (payload["models"]["generator"], payload["ema_updates"])
        for role, optimizer in self.optimizers.items():
            optimizer.load_state_dict(payload["optimizers"][role])
        for role, scheduler in self.schedulers.items():
            scheduler.load_state_dict(payload["schedulers"][role])
        if payload["scaler"]:
            self.scaler.load_state_dict(payload["scaler"])
        self.objective.load_extra_state(payload["objective_state"])
        for optimizer, scheduler in zip(self.optimizers.values(), self.schedulers.values(), strict=True):
            # the saved rates follow the saved schedule; `train.steps` may have been raised since
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                           strict=True):  # fmt: skip
                group["lr"] = base * factor(payload["step"])
        restore_rng_state(payload["rng"])
        if context.rank:  # ranks sample differently; rank 0's saved generators would make them agree
            torch.manual_seed(self.config.train.seed + context.rank + payload["step"])
        position = payload["data_position"]
        return TrainState(
            payload["step"], position["epoch"], position["batches_in_epoch"], payload["best_metric"]["value"]
        )


def train(config: Config, output_dir: str | Path, *, resume: bool = False) -> Path:
    """Train `config`'s experiment into `output_dir`; returns the path of ``checkpoints/last.pt``.

    Writes ``config.yaml`` (fully resolved), ``metrics.csv``, ``tensorboard/`` and
    ``checkpoints/{last,best}.pt``. With ``resume=True`` continues from ``checkpoints/last.pt``
    (``train.steps`` may be raised to train longer). Under torchrun, every rank calls this.
    """
    run_dir = Path(output_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if resume and not last.is_file():
        raise FileNotFoundError(f"{last}: no checkpoint to resume from")
    if not resume and last.is_file():
        raise ValueError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose another output"
        )
    if resume:
        check_resume(config, last)
    t = config.train
    context = init_distributed(t.device, timeout_s=t.dist_timeout_s, backend=t.dist_backend)
    try:
        with fresh_run_cleanup(run_dir, enabled=not resume and context.is_main):
            return _run(config, run_dir, resume=resume, context=context)
    finally:
        shutdown_distributed(context)


def _spec(config: Config) -> TaskSpec:
    """The experiment spec; a config that contradicts its preprocessed data is a usage error."""
    try:
        return training_spec(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_optimisers(objective: Objective, config: Config) -> tuple[dict, dict]:
    """Adam and the constant-then-linear-decay schedule (thesis §4.3), one pair per trained role."""
    t = config.train
    schedule = functools.partial(lr_factor, steps=t.steps, decay_start=t.decay_start)
    optimizers = {
        role: torch.optim.Adam(module.parameters(), lr=t.lr, betas=tuple(t.betas))
        for role, module in objective.modules_by_role().items()
    }
    schedulers = {role: torch.optim.lr_scheduler.LambdaLR(opt, schedule) for role, opt in optimizers.items()}
    return optimizers, schedulers


def _mean_losses(running: dict[str, list[float]], context: DistributedContext, logger: RunLogger) -> dict:
    """Mean of each loss since the last row, over steps and ranks; shown on the progress bar."""
    row = all_reduce_mean({name: float(np.mean(values)) for name, values in running.items()}, context)
    logger.progress(0, row)
    running.clear()
    return row


def _validate(
    validation: ValidationSet, objective: Objective, state: TrainState, checkpointer: _Checkpointer,
    best: Path, *, logger: RunLogger, device: torch.device, write: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Validate, keep the model with the largest PSNR margin over the baseline as `best` (with the
    correction off in each direction that falls back to its baseline: `ValidationSet.evaluate`; written
    where `write`: rank 0); → ``val_*``."""
    generator = checkpointer.generator()
    metrics = validation.evaluate(generator, device=device, logger=logger, step=state.step)
    objective.train()
    if metrics["psnr_margin"] > state.best_margin:
        state.best_margin = metrics["psnr_margin"]
        if write:
            if (off := getattr(generator, "baseline_only", None)) is not None:
                off.copy_(fallbacks(metrics))
            save_checkpoint(best, checkpointer.payload(state))
            if off is not None:
                off.zero_()  # training and last.pt keep every correction
    return {f"val_{k}": v for k, v in metrics.items()}


def _run(config: Config, run_dir: Path, *, resume: bool, context: DistributedContext) -> Path:
    config = holdout_config(config, run_dir, write=context.is_main)  # one case, no validation: split it
    barrier(context)
    t = config.train
    spec = _spec(config)
    seed_everything(t.seed + context.rank)
    device = context.device
    intensity = intensity_for_task(spec.task, spec.window)
    objective = build_training_objective(config).to(device)
    if device.type == "cpu":  # oneDNN's 3D convolution backward: ~15 % faster per step (benchmarks/README.md)
        objective.to(memory_format=torch.channels_last_3d)
    broadcast_module(objective, context)
    optimizers, schedulers = build_optimisers(objective, config)
    amp_dtype = runtime_amp_dtype(device, t.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp_dtype))
    checkpointer = _Checkpointer(config, spec, objective, optimizers, schedulers, scaler, intensity)
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    state = checkpointer.restore(last, context) if resume else TrainState()
    if context.is_main:
        save_config(config, run_dir / "config.yaml")
    dataset = _training_dataset(config, intensity, context)
    loader, sampler = _loader(dataset, config, context)
    validation = ValidationSet.from_config(config, intensity, context)  # every rank: its share of the cases
    logger = RunLogger(run_dir, start_step=state.step, total_steps=t.steps, enabled=context.is_main)
    running: dict[str, list[float]] = {}
    batches = _batches(dataset, loader, sampler, state)
    objective.train()
    if not resume and t.linear_fit_batches > 0:
        fit_batches = [_to_device(next(batches), device) for _ in range(t.linear_fit_batches)]
        fitted = objective.fit_linear_paths(
            fit_batches, symmetric=t.linear_fit_symmetric, clip=intensity.clipped_bounds
        )
        if fitted and t.linear_start == "strongest":
            chosen = objective.choose_linear_start(fit_batches, metric_bounds(config))
            for direction, (name, psnr, fit) in chosen.items():
                logger.note(f"linear start {direction}: {name} ({psnr:.2f} dB in the metric window on the "
                            f"fit batches; the least-squares fit {fit:.2f} dB)")
        if fitted:
            broadcast_module(objective, context)  # every rank starts from rank 0's fit
    if t.ema_decay > 0:  # from the fitted start, identical on every rank
        checkpointer.start_average(t.ema_decay)
    validate = functools.partial(_validate, validation, objective, state, checkpointer, best, logger=logger,
                                 device=device, write=context.is_main)  # fmt: skip
    if validation is not None and not resume:  # the untrained model (= its baseline) is the first best.pt
        logger.log(0, validate())
    while state.step < t.steps:
        batch = _to_device(next(batches), device)
        losses = train_step(
            objective, batch, optimizers=optimizers, scaler=scaler, amp_dtype=amp_dtype, context=context
        )
        try:
            require_finite_losses(losses, state.step + 1)  # before any checkpoint could hold NaN weights
        except ValueError:
            logger.close()  # ends the progress bar's line before the message
            raise
        losses["lr"] = optimizers["generator"].param_groups[0]["lr"]  # the rate this step used
        if checkpointer.average is not None:
            checkpointer.average.update(objective.generator)
        for scheduler in schedulers.values():
            scheduler.step()
        state.step += 1
        for name, value in losses.items():
            running.setdefault(name, []).append(value)
        final = state.step == t.steps
        row = _mean_losses(running, context, logger) if state.step % t.log_every == 0 or final else {}
        if validation is not None and (state.step % t.val_every == 0 or final):
            row.update(validate())
        if context.is_main and (state.step % t.checkpoint_every == 0 or final):
            save_checkpoint(last, checkpointer.payload(state))
        logger.log(state.step, row)
        logger.progress(1)
        if state.step % t.val_every == 0 or state.step % t.checkpoint_every == 0 or final:
            barrier(context)
    logger.close()
    return last
