"""Inference on files: a NIfTI file, a DICOM series or a folder of scans in, derived volumes out.

What ``revgan-med infer`` runs: each scan is read with its geometry, translated by
`revgan_med.inference.infer_volume` and written atomically (NIfTI or a new DICOM series), never over
or inside the input; folders are processed case by case, optionally as one shard of a job array, and a
failing scan is reported while the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from revgan_med.checkpoints import Model
from revgan_med.data.transforms import load_dti
from revgan_med.errormap import flip_predictions
from revgan_med.inference import consistency_summary, infer_volume
from revgan_med.io import VolumeRef, discover_volumes, load_volume, save_dicom_series, save_volume
from revgan_med.io.checks import check_output_location, require_finite
from revgan_med.io.dicom_writer import check_new_series_folder
from revgan_med.io.formats import one_line
from revgan_med.io.volumes import is_nifti
from revgan_med.sharding import shard_items


def _output_kind(direction: str, ensemble: bool) -> str:
    return f"{direction} flip-ensemble" if ensemble else direction


def derived_description(model: Model, direction: str, *, ensemble: bool = False) -> str:
    """The label every output carries: GAN outputs can invent or remove structures (§7.4)."""
    return f"revgan-med derived: {model.name} {_output_kind(direction, ensemble)}; not for diagnosis"


def _refuse_overwrite(input_path: Path, output_path: Path) -> None:
    src, dst = input_path.resolve(), output_path.resolve()
    if dst == src or (src.is_dir() and dst.is_relative_to(src)):
        raise ValueError(f"{output_path}: refusing to write over or inside the input {input_path}")


def infer_path(
    model: Model,
    input_path: str | Path,
    output_path: str | Path,
    *,
    series_uid: str | None = None,
    output_format: str = "nifti",
    consistency_map: str | Path | None = None,
    map_kind: str = "cycle",
    tilt: str = "correct",
    ensemble: bool | None = None,
    **options: Any,
) -> dict[str, float] | None:
    """Read a NIfTI file or DICOM series, `infer_volume(**options)`, write the result atomically.

    For dmri-sr models the input may be a 6-channel DTI NIfTI or a DWI series (`load_dti`).

    `output_format` ``nifti`` writes `output_path` (``.nii``/``.nii.gz``) with a "derived" ``descrip``;
    ``dicom`` writes a new derived series into the new folder `output_path` (an existing one is
    refused), referencing the source series when the input is DICOM; a gantry tilt corrected on
    loading (`tilt`, see `load_volume`) is said in both. `consistency_map` (NIfTI)
    receives |G(F(x)) − x| (`map_kind` ``cycle``) or the error map
    `revgan_med.errormap.flip_disagreement` (``flips``); its summary (`consistency_summary`) is
    returned. `ensemble` writes the mean of the predictions for the input as given, mirrored along
    each axis and x/y-swapped (`flip_predictions`, 4–5× the time) instead of the plain prediction; the
    error map is then their spread around that mean; None: the model's `ensemble` (its checkpoint's
    ``infer.ensemble``). Never writes over or inside the input.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if output_format not in ("nifti", "dicom"):
        raise ValueError(f"output format {output_format!r}: expected nifti or dicom")
    if output_format == "nifti" and not is_nifti(output_path):
        raise ValueError(f"{output_path}: NIfTI output needs a .nii or .nii.gz name")
    if output_format == "dicom":
        check_new_series_folder(output_path)
    for path in (output_path, consistency_map):
        if path is not None:
            _refuse_overwrite(input_path, Path(path))
            check_output_location(path)
    notes: list[str] = []
    if model.task == "dmri-sr":  # a DWI (NIfTI + .bval/.bvec, or DICOM) is fitted to tensors first
        array, _, affine, _ = load_dti(input_path, series_uid)
    else:
        array, affine = load_volume(input_path, series_uid=series_uid, tilt=tilt, notes=notes)
    require_finite(array, input_path)  # cubic upsampling and convolutions would spread NaN/Inf everywhere
    if min(array.shape[:3]) < 2:
        raise ValueError(f"{input_path}: a 2D image (shape {array.shape}); infer needs a 3D volume")
    direction = options.get("direction", "forward")
    ensemble = model.ensemble if ensemble is None else ensemble
    if map_kind not in ("cycle", "flips"):
        raise ValueError(f"map kind {map_kind!r}: expected cycle or flips")
    cycle = consistency_map is not None and map_kind == "cycle"
    result = infer_volume(model, array, affine, consistency=cycle, **options)
    flips = None
    if ensemble or (consistency_map is not None and map_kind == "flips"):
        flips = flip_predictions(model, array, affine, result.array, **options)
        if ensemble:
            result.array = flips.mean(axis=0)
    require_finite(result.array, f"{input_path}: the model's output")  # e.g. a checkpoint with NaN weights
    description = derived_description(model, direction, ensemble=ensemble) + (
        "; tilt corrected" if notes else ""
    )
    if output_format == "dicom":
        if result.array.ndim != 3:
            raise ValueError(
                f"{input_path}: DICOM output needs a scalar volume, got shape {result.array.shape}"
            )
        save_dicom_series(
            result.array,
            result.affine,
            output_path,
            series_description=f"revgan-med derived {model.name} {_output_kind(direction, ensemble)}"
            + (" tilt-corrected" if notes else ""),
            source=None if is_nifti(input_path) else input_path,
            source_series_uid=series_uid,
        )
    else:
        save_volume(result.array, result.affine, output_path, description=description)
    if consistency_map is None:
        return None
    if map_kind == "flips":
        result.consistency, result.consistency_affine = flips.std(axis=0), result.affine
    kind = "error map" if map_kind == "flips" else "consistency |G(F(x))-x|"
    label = f"revgan-med {kind}: {model.name} {direction}"
    save_volume(result.consistency, result.consistency_affine, Path(consistency_map), description=label)
    return consistency_summary(result.consistency)


def _window_bar() -> Callable[[int, int], None]:
    """A `progress(done, total)` callback drawing a per-window bar (created at the first call)."""
    bar: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bar or bar[0].total != total or done <= bar[0].n:  # a new pass (consistency runs two)
            bar[:] = [tqdm(total=total, desc="infer", unit="window", leave=False)]
        bar[0].update(done - bar[0].n)
        if done == total:
            bar[0].close()

    return update


@dataclass
class BatchReport:
    """A folder run: (input, output, consistency summary) per success, (input, message) per failure."""

    done: list[tuple[Path, Path, dict[str, float] | None]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def infer_inputs(
    model: Model,
    input_path: str | Path,
    output_path: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    output_format: str = "nifti",
    consistency_map: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> BatchReport:
    """Infer a NIfTI file, a DICOM series folder, or every scan under a folder.

    One scan (a file, or a folder holding exactly one DICOM series) is written to `output_path`
    (and `consistency_map`) as given. Otherwise every scan `discover_volumes` finds, sorted by case
    name and cut to this `shard` (i, n), goes to ``output_path/<name>.nii.gz`` (or ``<name>/`` for
    DICOM) and ``consistency_map/<name>.nii.gz``; a failing scan is recorded in the report and the
    others still run. Options as `infer_path`.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    refs = (
        discover_volumes(input_path)
        if input_path.is_dir()
        else [VolumeRef(input_path, None, input_path.name)]
    )
    single = len(refs) == 1 and Path(refs[0].path).resolve() == input_path.resolve()
    if not refs:
        raise ValueError(f"{input_path}: no NIfTI file or DICOM series found")
    for root in () if single else (output_path, consistency_map):
        if root is not None:
            _refuse_overwrite(input_path, Path(root))  # a re-run would otherwise discover its own outputs
    jobs = []
    for ref in [refs[0]] if single else shard_items(sorted(refs, key=lambda r: r.name), *shard):
        out, cmap = output_path, consistency_map
        if not single:
            out = output_path / (ref.name + (".nii.gz" if output_format == "nifti" else ""))
            cmap = None if consistency_map is None else Path(consistency_map) / f"{ref.name}.nii.gz"
        jobs.append((ref, out, cmap))
    report = BatchReport()
    if single and progress and "progress" not in options:
        options["progress"] = _window_bar()  # one scan: show its windows instead
    for ref, out, cmap in tqdm(jobs, desc="infer", unit="scan", disable=not progress or single):
        try:
            summary = infer_path(
                model, ref.path, out, series_uid=ref.series_uid, output_format=output_format,
                consistency_map=cmap, **options,
            )  # fmt: skip
        except Exception as exc:  # one bad scan must not stop the batch; reported with its path
            report.failed.append((Path(ref.path), _problem(exc, ref.path)))
            continue
        report.done.append((Path(ref.path), out, summary))
    return report


def _problem(exc: Exception, path: str | Path) -> str:
    """One scan's failure as one line for ``FAILED <path>: <problem>``: a message that already starts
    with the path (or one of its files, ``<path>/<file>: …``) loses that prefix, so the path is said once."""
    message, prefix = one_line(exc), str(path)
    if message.startswith(prefix) and message[len(prefix) : len(prefix) + 1] in (":", "/"):
        return message[len(prefix) :].lstrip("/:").lstrip()
    return f"{type(exc).__name__}: {message}"
