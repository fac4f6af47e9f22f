"""Intensity mappings (CT windows, DTI scaling) as plain classes and invertible MONAI dict transforms.

A mapping turns scanner units into network units and back: `normalize(array)`, `denormalize(array)`,
`to_dict()` (plain data stored in checkpoints) and `intensity_from_dict(d)` to rebuild it. CT uses a
fixed HU window (thesis §5.4–5.5); dMRI uses a per-channel robust scale of the 6 DTI components
fitted on the input volume itself, so inference can fit the same scale on a new input (§5.3).

Also here: the diffusion-tensor fit from DWI + bval/bvec, the brain mask and the "interior" mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import InvertibleTransform, MapTransform, ScaleIntensityRange
from scipy.ndimage import binary_erosion, binary_fill_holes, label

from revgan_med.io import is_nifti, load_volume
from revgan_med.io.dwi import load_dwi
from revgan_med.tasks import DEFAULT_WINDOW, WindowSpec, parse_window


class CTWindow:
    """HU → [-1, 1] linearly over [lo, hi] with clipping; `denormalize` is the exact inverse on [-1, 1].

    Values outside the window are clipped to ±1 and cannot come back: `denormalize(normalize(hu))`
    equals `clip(hu, lo, hi)`.
    """

    kind = "ct-window"
    clipped_bounds = (-1.0, 1.0)  # normalised values here may have been clipped (`LinearPath.unclipped`)

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = parse_window([lo, hi])
        # MONAI's ScaleIntensityRange(clip=True) is exactly the forward window; it has no inverse.
        self._forward = ScaleIntensityRange(a_min=self.lo, a_max=self.hi, b_min=-1.0, b_max=1.0, clip=True)

    def normalize(self, array: np.ndarray) -> np.ndarray:
        out = self._forward(np.asarray(array, dtype=np.float32))
        return np.asarray(out, dtype=np.float32)

    def denormalize(self, array: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(array, dtype=np.float32), -1.0, 1.0)
        return ((x + 1.0) * 0.5 * (self.hi - self.lo) + self.lo).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "window": [self.lo, self.hi]}

    def __repr__(self) -> str:
        return f"CTWindow({self.lo}, {self.hi})"


class DTIScale:
    """Per-channel robust scaling of 6-channel DTI: channel c is divided by `scales[c]`.

    `scales[c]` is the `percentile` of |value| of channel c inside the brain mask of the volume it is
    fitted on. Unfitted (scales None) it is a recipe: `fit(volume, mask)` returns a fitted copy whose
    `to_dict` holds the scales, which is all `denormalize` needs. Fit on the network INPUT so the
    same scales can be computed at inference time. The channel axis is last by default (as loaded).
    """

    kind = "dti-scale"
    clipped_bounds = None  # nothing is clipped

    def __init__(self, percentile: float = 99.5, scales: Sequence[float] | None = None) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"DTIScale percentile {percentile!r}: must be in (0, 100]")
        self.percentile = float(percentile)
        self.scales = None if scales is None else np.asarray(scales, dtype=np.float64)

    def fit(self, volume: np.ndarray, mask: np.ndarray | None = None, *, channel_axis: int = -1) -> DTIScale:
        """A fitted copy; `mask` (spatial shape) selects the voxels, default all non-zero voxels."""
        chans = np.moveaxis(np.asarray(volume, dtype=np.float64), channel_axis, -1)
        sel = np.any(chans != 0, axis=-1) if mask is None else np.asarray(mask, dtype=bool)
        if sel.shape != chans.shape[:-1] or not sel.any():
            raise ValueError(f"DTIScale.fit: empty or mismatched mask {sel.shape} for volume {chans.shape}")
        scales = np.percentile(np.abs(chans[sel]), self.percentile, axis=0)
        scales[scales <= 0] = 1.0  # an all-zero channel is left unscaled
        return DTIScale(self.percentile, scales)

    def _shape(self, array: np.ndarray, channel_axis: int) -> np.ndarray:
        if self.scales is None:
            raise ValueError("DTIScale is not fitted: call fit(volume, mask) first")
        if array.shape[channel_axis] != len(self.scales):
            raise ValueError(f"DTIScale: expected {len(self.scales)} channels, got shape {array.shape}")
        shape = [1] * array.ndim
        shape[channel_axis] = len(self.scales)
        return self.scales.reshape(shape)

    def normalize(self, array: np.ndarray, *, channel_axis: int = -1) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        return (array / self._shape(array, channel_axis)).astype(np.float32)

    def denormalize(self, array: np.ndarray, *, channel_axis: int = -1) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        return (array * self._shape(array, channel_axis)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        scales = None if self.scales is None else [float(s) for s in self.scales]
        return {"kind": self.kind, "percentile": self.percentile, "scales": scales}

    def __repr__(self) -> str:
        return f"DTIScale(percentile={self.percentile}, scales={self.to_dict()['scales']})"


IntensityMapping = CTWindow | DTIScale


def intensity_from_dict(d: Mapping[str, Any]) -> IntensityMapping:
    """Rebuild a mapping from its `to_dict()` (e.g. from a checkpoint)."""
    kind = d.get("kind")
    if kind == CTWindow.kind:
        return CTWindow(*d["window"])
    if kind == DTIScale.kind:
        return DTIScale(d.get("percentile", 99.5), d.get("scales"))
    raise ValueError(f"unknown intensity mapping kind {kind!r}; valid: {CTWindow.kind}, {DTIScale.kind}")


def intensity_for_task(task: str, window: WindowSpec | None = None) -> IntensityMapping:
    """The mapping a task trains with: the CT window (None: the default) for ct-sr/ct-kernel, an
    unfitted DTIScale for dmri-sr."""
    if task in ("ct-sr", "ct-kernel"):
        return CTWindow(*parse_window(DEFAULT_WINDOW if window is None else window))
    if task == "dmri-sr":
        return DTIScale()
    raise ValueError(f"unknown task {task!r}; valid: ct-sr, ct-kernel, dmri-sr")


class IntensityMapd(MapTransform, InvertibleTransform):
    """Dict transform applying an intensity mapping to channel-first arrays (C, D, H, W); invertible.

    An unfitted `DTIScale` is fitted on `fit_key` (the input) inside `mask_key` (if given) and the
    fitted mapping is recorded with each key, so `.inverse(d)` (or MONAI's `Invertd`) maps back.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        *,
        mapping: IntensityMapping,
        fit_key: Hashable | None = None,
        mask_key: Hashable | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mapping = mapping
        self.fit_key, self.mask_key = fit_key, mask_key

    def _fitted(self, d: Mapping[Hashable, Any]) -> IntensityMapping:
        if not isinstance(self.mapping, DTIScale) or self.mapping.scales is not None:
            return self.mapping
        if self.fit_key is None:
            raise ValueError("IntensityMapd: an unfitted DTIScale needs fit_key")
        mask = (
            None if self.mask_key is None else np.asarray(d[self.mask_key]).reshape(d[self.fit_key].shape[1:])
        )
        return self.mapping.fit(np.asarray(d[self.fit_key]), mask, channel_axis=0)

    @staticmethod
    def _apply(mapping: IntensityMapping, array: Any, forward: bool) -> np.ndarray:
        fn = mapping.normalize if forward else mapping.denormalize
        kwargs = {"channel_axis": 0} if isinstance(mapping, DTIScale) else {}
        return fn(np.asarray(array), **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mapping = self._fitted(d)
        for key in self.key_iterator(d):
            d[key] = self._apply(mapping, d[key], forward=True)
            self.push_transform(d, key, extra_info={"mapping": mapping.to_dict()})
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d, key)
            mapping = intensity_from_dict(info["extra_info"]["mapping"])
            d[key] = self._apply(mapping, d[key], forward=False)
        return d


def fit_dti(
    dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Least-squares diffusion tensor fit (dipy) of a DWI series (x, y, z, n) → (x, y, z, 6) float32.

    Channel order is the FSL/dipy lower-triangular order (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz) in mm²/s;
    voxels outside `mask` are 0. `bvecs` is (n, 3) or (3, n) as in FSL files.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = np.asarray(bvecs, dtype=np.float64)
    bvecs = bvecs.T if bvecs.shape[0] == 3 and bvecs.shape[1] != 3 else bvecs
    if dwi.ndim != 4 or dwi.shape[-1] != len(bvals) or bvecs.shape != (len(bvals), 3):
        raise ValueError(f"fit_dti: DWI {dwi.shape} does not match {len(bvals)} bvals / bvecs {bvecs.shape}")
    gtab = gradient_table(bvals, bvecs=bvecs)
    fit = TensorModel(gtab, fit_method="LS").fit(np.asarray(dwi, dtype=np.float64), mask=mask)
    return np.nan_to_num(fit.lower_triangular()).astype(np.float32)


def brain_mask(dwi: np.ndarray, bvals: np.ndarray | None = None) -> np.ndarray:
    """Brain mask, bool (x, y, z), from the mean b≈0 image (all volumes without bvals).

    dipy's median_otsu threshold, then clean-up it lacks: the largest connected component only (drops
    eyes, scalp and noise islands) with its holes filled slice by slice and in 3D (ventricles, whose
    b0 signal can fall below the threshold, belong to the brain).
    """
    from dipy.segment.mask import median_otsu

    dwi = np.asarray(dwi, dtype=np.float32)
    if dwi.ndim == 3:
        ref = dwi
    else:
        b0 = np.ones(dwi.shape[-1], bool) if bvals is None else np.asarray(bvals).ravel() < 50
        ref = dwi[..., b0 if b0.any() else slice(None)].mean(axis=-1)
    _, mask = median_otsu(ref, median_radius=2, numpass=1)
    labels, count = label(mask)
    if count > 1:
        mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    for z in range(mask.shape[2]):
        mask[:, :, z] = binary_fill_holes(mask[:, :, z])
    return binary_fill_holes(mask).astype(bool)


def load_dti(
    path: str | Path, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(DTI (x, y, z, 6), brain mask, affine, note) from a 6-channel DTI NIfTI, a DWI NIfTI with
    .bval/.bvec beside it, or a DICOM DWI series (`revgan_med.io.dwi.load_dwi`).

    DWI is fitted by `fit_dti` inside `brain_mask`; a given DTI's mask is its non-zero voxels.
    """
    path = Path(path)
    if is_nifti(path) and _nifti_channels(path) == 6:
        data, affine = load_volume(path)
        return data, np.any(data != 0, axis=-1), affine, "DTI as given"
    dwi = load_dwi(path, series_uid)
    mask = brain_mask(dwi.data, dwi.bvals)
    return fit_dti(dwi.data, dwi.bvals, dwi.bvecs, mask), mask, dwi.affine, "tensor fitted from DWI"


def _nifti_channels(path: Path) -> int | None:
    """Volumes (last axis) of a 4D NIfTI from its header alone; None when 3D or unreadable."""
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception:  # nibabel raises many types; load_volume reports the problem with the path
        return None
    return shape[-1] if len(shape) >= 4 else None  # (x, y, z, 1, c): vector images as ITK writes them


def interior_mask(mask: np.ndarray) -> np.ndarray:
    """Voxels whose whole 5×5×5 neighbourhood lies inside `mask` (binary erosion by a 5³ cube, §5.3)."""
    return binary_erosion(np.asarray(mask, dtype=bool), structure=np.ones((5, 5, 5), bool), border_value=0)
