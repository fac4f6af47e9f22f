"""Datalists, whole-case loading for validation, and the cached patch dataset for training.

Every case is brought onto ONE grid before anything is cropped: a super-resolution input (stored on
its own LR grid by `preprocess`) is mapped onto the target's HR grid with `upsample_to_hr`, so a
patch at the same voxel indices of input and target is at the same world location. Volumes are
normalised with the intensity mapping that goes into the checkpoint and kept channel-first (C, X, Y, Z).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform
from torch.utils.data import Dataset

from revgan_med.data.degradation import input_support, upsample_to_hr
from revgan_med.data.sampling import crop, ct_body, ct_foreground, pad_to_size, sample_origin, xy_alike
from revgan_med.data.transforms import (
    CTWindow,
    DTIScale,
    IntensityMapping,
    WindowSpec,
    intensity_for_task,
)
from revgan_med.io import load_volume
from revgan_med.tasks import SR_TASKS

IntensityOrWindow = IntensityMapping | WindowSpec
GRID_TOLERANCE_MM = 1e-3


def load_datalist(path: str | Path, split: str) -> list[dict]:
    """The `split` list ("training" / "validation") of a MONAI datalist; paths made absolute
    relative to the datalist file."""
    from monai.data import load_decathlon_datalist

    path = Path(path).absolute()  # MONAI joins base_dir already; relative paths must not join twice
    if not path.is_file():
        raise ValueError(f"{path}: datalist not found")
    try:
        items = load_decathlon_datalist(
            path, is_segmentation=False, data_list_key=split, base_dir=path.parent
        )
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: no usable {split!r} list ({exc})") from None
    for item in items:  # MONAI leaves paths of missing files relative; resolve every volume key
        for key in ("image", "target", "mask"):
            if key in item:
                item[key] = str((path.parent / item[key]).resolve())
    return items


def resolve_intensity(task: str, intensity_or_window: IntensityOrWindow) -> IntensityMapping:
    """A mapping object as given, or the task's mapping for a window spec."""
    if isinstance(intensity_or_window, (CTWindow, DTIScale)):
        return intensity_or_window
    return intensity_for_task(task, intensity_or_window)


def _channel_first(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(array, 3, 0) if array.ndim == 4 else array[None])


def load_case(
    case: dict,
    *,
    task: str,
    intensity_or_window: IntensityOrWindow,
    factors: Sequence[int],
    upsample: str,
    body: bool = False,
) -> dict[str, Any]:
    """One datalist item → normalised input on the target grid and target, both (C, X, Y, Z) float32.

    Returns ``image``, ``target``, ``affine`` (the target grid), ``mask`` (evaluation/foreground
    mask of the target: > −500 HU for CT, the brain mask for dMRI), ``image_mask`` (the same
    for the input), ``mapping`` (fitted for dMRI: scales of this input) and ``name``; with `body`
    also ``body``, the target's anatomy (`ct_body` for CT: lungs in, couch out; the brain mask for dMRI).
    """
    image, image_affine = load_volume(case["image"])
    target, affine = load_volume(case["target"])
    if task == "dmri-sr":  # the brain as the input shows it: the DTI scaling is fitted there
        brain = input_support(image, image_affine, factors, target.shape[:3])
    if task in SR_TASKS:
        image, image_affine = upsample_to_hr(
            image, image_affine, factors, mode=upsample, hr_shape=target.shape[:3]
        )
    if image.shape[:3] != target.shape[:3] or not np.allclose(image_affine, affine, atol=GRID_TOLERANCE_MM):
        raise ValueError(f"{case['image']}: grid does not coincide with the target {case['target']}")
    mapping = resolve_intensity(task, intensity_or_window)
    if task == "dmri-sr":
        mask = load_volume(case["mask"])[0] > 0 if "mask" in case else np.any(target != 0, axis=-1)
        image_mask = mask
        if isinstance(mapping, DTIScale) and mapping.scales is None:
            mapping = mapping.fit(image, brain)  # inside the input's brain: what inference can do too
    else:
        mask, image_mask = ct_foreground(target), ct_foreground(image)
    extra = {"body": ct_body(target) if task != "dmri-sr" else mask} if body else {}
    return {
        "image": _channel_first(mapping.normalize(image)),
        "target": _channel_first(mapping.normalize(target)),
        "affine": affine,
        "mask": mask,
        "image_mask": image_mask,
        "mapping": mapping,
        "name": case.get("name") or Path(case["target"]).parent.name,
        **extra,
    }


class _LoadPadded(Transform):
    """Load a case and pad it to at least the patch size (CT with air, dMRI with zeros).

    A MONAI `Transform` (deterministic), so CacheDataset caches its output instead of re-running it.
    """

    def __init__(self, patch_size: Sequence[int], **load_kwargs: Any) -> None:
        self.patch_size, self.load_kwargs = patch_size, load_kwargs

    def __call__(self, case: dict) -> dict[str, Any]:
        c = load_case(case, **self.load_kwargs)
        mapping = c["mapping"]
        value = float(mapping.normalize(np.float32([-1000.0]))[0]) if isinstance(mapping, CTWindow) else 0.0
        for key, pad_value in (("image", value), ("target", value), ("mask", False), ("image_mask", False),
                               ("body", False)):  # fmt: skip
            if key in c:
                c[key] = pad_to_size(c[key], self.patch_size, value=pad_value)
        return c


def shard_cases(cases: Sequence[dict], rank: int, world_size: int) -> list[dict]:
    """Rank `rank`'s share of `cases` (every `world_size`-th, from `rank`), wrapping round so that every
    rank holds ceil(n / world_size) cases: each process caches only its share, and equal shares keep
    the ranks' epochs (and a resumed data position) in step."""
    per_rank = -(-len(cases) // world_size)
    return [cases[(rank + k * world_size) % len(cases)] for k in range(per_rank)]


class PatchDataset(Dataset):
    """Random patches for training: ``{"image": (C, D, H, W), "target": (C, D, H, W)}`` float tensors.

    Cases are loaded once, normalised, put on the target grid and cached in memory (MONAI
    CacheDataset, `num_workers` threads). Item i comes from case ``i // samples_per_volume`` and is
    drawn with a generator seeded by (seed, epoch, i): call `set_epoch` each epoch for fresh but
    reproducible (resumable, shardable) streams. Patches with less than `foreground_fraction`
    foreground are skipped. `paired=False` draws the target from an independent random case and
    location (CycleGAN-style unpaired sampling). `body` (paired only) adds ``"body"``, (1, D, H, W) bool:
    the target patch's anatomy (`load_case`), where ``loss.region: body`` trains. `augment` mirrors each
    item's patches along random axes and, where patch and `factors` are square in-plane, turns them by a
    random quarter turn in-plane (`dihedral`); CT only.
    """

    def __init__(
        self,
        cases: Sequence[dict],
        *,
        task: str,
        intensity_or_window: IntensityOrWindow,
        patch_size: Sequence[int],
        samples_per_volume: int,
        foreground_fraction: float,
        factors: Sequence[int],
        upsample: str,
        paired: bool = True,
        body: bool = False,
        augment: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        from monai.data import CacheDataset

        if not cases:
            raise ValueError("PatchDataset: no cases")
        if len(patch_size) != 3 or min(patch_size) < 1 or samples_per_volume < 1:
            raise ValueError(
                f"PatchDataset: bad patch_size {patch_size!r} / samples_per_volume {samples_per_volume}"
            )
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.foreground_fraction = float(foreground_fraction)
        if body and not paired:
            raise ValueError("PatchDataset: a body mask needs paired patches")
        self.paired, self.seed = paired, int(seed)
        if augment and task == "dmri-sr":
            raise ValueError("PatchDataset: augment mirrors CT only (DTI components would change sign)")
        self.augment, self.quarter_turns = bool(augment), xy_alike(factors, self.patch_size)
        # shared memory: persistent loader workers see `set_epoch` without being re-forked
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        load = _LoadPadded(self.patch_size, task=task, intensity_or_window=intensity_or_window,
                           factors=factors, upsample=upsample, body=body)  # fmt: skip
        self.cases = CacheDataset(
            list(cases), transform=load, num_workers=num_workers or None, progress=False, copy_cache=False
        )

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_volume

    def _patch(
        self, case: dict, key: str, mask_key: str, rng: np.random.Generator
    ) -> tuple[np.ndarray, tuple]:
        origin = sample_origin(
            case[mask_key], self.patch_size, min_fraction=self.foreground_fraction, rng=rng
        )
        return crop(case[key], origin, self.patch_size), origin

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"PatchDataset index {index} out of range (len {len(self)})")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        case = self.cases[index // self.samples_per_volume]
        patches = {}
        if self.paired:
            patches["target"], origin = self._patch(case, "target", "mask", rng)
            patches["image"] = crop(case["image"], origin, self.patch_size)
            if "body" in case:
                patches["body"] = crop(case["body"], origin, self.patch_size)[None]
        else:
            patches["image"], _ = self._patch(case, "image", "image_mask", rng)
            other = self.cases[int(rng.integers(len(self.cases)))]
            patches["target"], _ = self._patch(other, "target", "mask", rng)
        if self.augment:  # drawn after the patch origins: the same patches as without augmentation
            flips, turns = rng.random(3) < 0.5, int(rng.integers(4)) if self.quarter_turns else 0
            patches = {key: dihedral(patch, flips, turns) for key, patch in patches.items()}
        return {key: torch.from_numpy(np.ascontiguousarray(patch)) for key, patch in patches.items()}


def dihedral(patch: np.ndarray, flips: Sequence[bool], turns: int) -> np.ndarray:
    """`patch` (C, X, Y, Z) mirrored along the spatial axes where `flips` is true, then turned `turns`
    quarter turns in the x-y plane. With the item's own generator, not MONAI's RandFlipd / RandRotate90d,
    whose random state is the transform's: the item's (seed, epoch, index) stream keeps augmented patches
    reproducible, resumable and identical for image, target and mask."""
    axes = [axis + 1 for axis, flip in enumerate(flips) if flip]
    return np.rot90(np.flip(patch, axis=axes) if axes else patch, turns, axes=(1, 2))
