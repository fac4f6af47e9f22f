"""Batch preprocessing: a folder of scans → per-case NIfTI training pairs, `datalist.json`, `report.csv`.

Per case, ``OUTPUT_DIR/<case>/`` holds ``image.nii.gz`` (the network input: the degraded LR volume
on its own LR grid for ct-sr / dmri-sr, as a real thick-slice scan would be, or the source kernel
for ct-kernel), ``target.nii.gz`` (the reference), ``mask.nii.gz`` (dMRI brain mask) and
``case.json`` (provenance; written last, so it marks a finished case). Volumes stay in HU / scanner
units: normalisation happens in the dataset with the mapping stored in the checkpoint.
Inputs are only read; every output is written atomically, and only inside OUTPUT_DIR; a failing case
is reported and skipped. ``case.json`` records the input's identity (`input_identity`): a case whose
input changed is made again, and temporary files of a killed earlier run are removed from its folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from revgan_med.config import ConfigError
from revgan_med.data.degradation import SIMULATED_KERNEL_NOTE, simulate_kernel_pair, thick_slice
from revgan_med.data.transforms import load_dti
from revgan_med.io import atomic_write_text, discover_volumes, load_volume, save_volume
from revgan_med.io.atomic import remove_stale_temps
from revgan_med.io.checks import (
    check_output_location,
    input_identity,
    require_finite,
    require_inside,
    safe_component,
)
from revgan_med.io.dwi import gradient_files
from revgan_med.io.formats import is_nifti, one_line
from revgan_med.io.tilt import TILT_MODES
from revgan_med.sharding import shard_items
from revgan_med.tasks import DEFAULT_FACTORS, TASKS, TaskSpec, WindowSpec, parse_factors

GRID_ATOL_MM = 1e-2  # source/target grids of a kernel pair must agree to 0.01 mm
REPORT_FIELDS = ("case", "source", "status", "message")


@dataclass(frozen=True)
class Job:
    """One case to make: where its input(s) are and the settings that decide its outputs."""

    case: str
    source: Path
    series_uid: str | None = None
    target: Path | None = None  # ct-kernel pairs only
    problem: str = ""  # a layout problem found during discovery: the case fails with this message

    @property
    def label(self) -> str:
        text = str(self.source) + (f" (series {self.series_uid})" if self.series_uid else "")
        return text + (f" -> {self.target}" if self.target else "")

    @property
    def inputs(self) -> list[Path]:
        """Every file or folder the case reads (never written to)."""
        sidecars = [p for p in gradient_files(self.source) if p.is_file()] if is_nifti(self.source) else []
        return [self.source, *([self.target] if self.target else []), *sidecars]


@dataclass(frozen=True)
class Settings:
    task: str
    factors: tuple[int, int, int]
    simulate_kernel: bool
    tilt: str = "correct"  # gantry-tilted CT: "correct" (resample) or "refuse"


@dataclass
class CaseResult:
    case: str
    source: str
    status: str  # ok | failed | skipped
    message: str = ""
    files: dict[str, str] = field(default_factory=dict)  # datalist key → file name in the case folder


@dataclass
class PreprocessReport:
    """What `preprocess` did, one row per case; `exit_code` is 0 when nothing failed, else 1."""

    rows: list[CaseResult]
    datalist_path: Path
    report_path: Path

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("failed") else 0


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def _crop_to_factors(array: np.ndarray, factors: Sequence[int], where: str) -> np.ndarray:
    n = np.asarray(array.shape[:3]) // factors * factors
    if (n == 0).any():
        raise ValueError(f"{where}: volume {array.shape[:3]} is smaller than the factors {tuple(factors)}")
    return array[: n[0], : n[1], : n[2]]


def _load_finite(path: Path, series_uid: str | None = None, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """`load_volume(**options)`, refusing NaN/Inf voxels: they would become NaN training pairs and weights."""
    array, affine = load_volume(path, series_uid=series_uid, **options)
    require_finite(array, path)
    return array, affine


def _make_ct_sr(job: Job, s: Settings) -> tuple[dict, str]:
    notes: list[str] = []  # e.g. a gantry tilt corrected while loading: said in every description
    hu, affine = _load_finite(job.source, job.series_uid, tilt=s.tilt, notes=notes)
    if hu.ndim != 3:
        raise ValueError(f"{job.source}: expected a 3D CT volume, got shape {hu.shape}")
    hr = _crop_to_factors(hu, s.factors, str(job.source))  # the crop keeps voxel 0, so the affine holds
    lr, lr_affine = thick_slice(hr, affine, s.factors)
    f, extra = ",".join(map(str, s.factors)), "".join(f"; {n}" for n in notes)
    return {"image": (lr, lr_affine, f"simulated thick-slice input, factors {f}{extra}"),
            "target": (hr, affine, f"high-resolution reference{extra}")}, "; ".join(notes)  # fmt: skip


def _make_dmri_sr(job: Job, s: Settings) -> tuple[dict, str]:
    dti, mask, affine, note = load_dti(job.source, job.series_uid)
    require_finite(dti, job.source)  # NaN/Inf tensors would become NaN training pairs and weights
    hr, mask = _crop_to_factors(dti, s.factors, str(job.source)), _crop_to_factors(mask, s.factors, "mask")
    lr, lr_affine = thick_slice(hr, affine, s.factors)
    f = ",".join(map(str, s.factors))
    return {"image": (lr, lr_affine, f"simulated thick-slice DTI, factors {f}"),
            "target": (hr, affine, "DTI reference (Dxx,Dxy,Dyy,Dxz,Dyz,Dzz)"),
            "mask": (mask.astype(np.uint8), affine, "brain mask")}, note  # fmt: skip


def _make_ct_kernel(job: Job, s: Settings) -> tuple[dict, str]:
    notes: list[str] = []
    source, affine = _load_finite(job.source, job.series_uid, tilt=s.tilt, notes=notes)
    if source.ndim != 3:
        raise ValueError(f"{job.source}: expected a 3D CT volume, got shape {source.shape}")
    if s.simulate_kernel:
        smooth, sharp = simulate_kernel_pair(source, _spacing(affine), seed=zlib.crc32(job.case.encode()))
        return {"image": (smooth, affine, "SIMULATED smooth kernel"),
                "target": (sharp, affine, "SIMULATED sharp kernel")}, SIMULATED_KERNEL_NOTE  # fmt: skip
    target, target_affine = _load_finite(job.target, tilt=s.tilt, notes=notes)
    if source.shape != target.shape or not np.allclose(affine, target_affine, atol=GRID_ATOL_MM):
        raise ValueError(
            f"{job.source} and {job.target}: grids do not coincide (shapes {source.shape} / {target.shape}, "
            f"max affine difference {np.abs(affine - target_affine).max():.3g} mm)"
        )
    extra = "".join(f"; {n}" for n in notes)
    return {
        "image": (source, affine, f"source kernel{extra}"),
        "target": (target, target_affine, f"target kernel{extra}"),
    }, "; ".join(notes)


MAKERS = {"ct-sr": _make_ct_sr, "dmri-sr": _make_dmri_sr, "ct-kernel": _make_ct_kernel}


def _provenance(job: Job, s: Settings) -> dict:
    return {"case": job.case, "source": job.label, **asdict(s), "factors": list(s.factors)}


def _finished(folder: Path, wanted: dict) -> dict[str, str] | None:
    """The files of a finished case made from `wanted` (settings, input identity), else None."""
    try:
        done = json.loads((folder / "case.json").read_text())
    except (OSError, ValueError):
        return None
    files = done.get("files", {}) if isinstance(done, dict) else {}
    same = {k: done.get(k) for k in wanted} == wanted
    return files if same and all((folder / f).is_file() for f in files.values()) else None


def _destination(output_dir: Path, job: Job, name: str) -> Path:
    """The one way to a case's output file: proven to lie in OUTPUT_DIR/<case>/ and to be no input."""
    return require_inside(output_dir / job.case / name, output_dir, job.inputs)


def process_case(job: Job, settings: Settings, output_dir: Path, overwrite: bool) -> CaseResult:
    """Make one case's files (or skip it when it is finished from the same input and settings)."""
    if job.problem:
        return CaseResult(job.case, job.label, "failed", job.problem)
    try:
        folder = _destination(output_dir, job, ".")
        remove_stale_temps(folder)  # left by a run that was killed while writing
        wanted = {
            **_provenance(job, settings),
            "input": [input_identity(p, job.series_uid) for p in job.inputs],
        }
        files = None if overwrite else _finished(folder, wanted)
        if files is not None:
            return CaseResult(job.case, job.label, "skipped", "already done", files)
        volumes, note = MAKERS[settings.task](job, settings)
        for key, (array, _, _) in volumes.items():
            require_finite(array, f"{job.label}: {key}")
        files = {}
        for key, (array, affine, description) in volumes.items():
            files[key] = f"{key}.nii.gz"
            save_volume(array, affine, _destination(output_dir, job, files[key]), description=description)
        record = {**wanted, "files": files, "note": note}
        atomic_write_text(_destination(output_dir, job, "case.json"), json.dumps(record, indent=2) + "\n")
    except Exception as exc:  # any failure of one case is reported and the batch goes on
        return CaseResult(job.case, job.label, "failed", one_line(exc))
    return CaseResult(job.case, job.label, "ok", note, files)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _pair_entry(folder: Path, role: str) -> Path | None:
    for name in (f"{role}.nii.gz", f"{role}.nii", role):
        if (folder / name).exists():
            return folder / name
    return None


def find_jobs(
    input_dir: Path, output_dir: Path, *, task: str, pairs_csv: Path | None, simulate_kernel: bool
) -> list[Job]:
    """The cases under `input_dir` (outputs under `output_dir` are never treated as inputs)."""
    if task == "ct-kernel" and pairs_csv is not None:
        return _jobs_from_csv(pairs_csv)
    if task == "ct-kernel" and not simulate_kernel:
        jobs = []
        for folder in sorted(p for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _inside(folder, output_dir) or not any(folder.iterdir()):
                continue
            source, target = _pair_entry(folder, "source"), _pair_entry(folder, "target")
            problem = (
                ""
                if source and target
                else f"{folder}: expected 'source' and 'target' (NIfTI file or DICOM folder)"
            )
            jobs.append(Job(folder.name, source or folder, target=target, problem=problem))
        return jobs
    refs = [r for r in discover_volumes(input_dir) if not _inside(r.path, output_dir)]
    return [Job(r.name, r.path, r.series_uid) for r in refs]


def _jobs_from_csv(path: Path) -> list[Job]:
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read pairs CSV ({exc})") from None
    if not rows or not {"case", "source", "target"} <= set(rows[0]):
        raise ConfigError(f"{path}: pairs CSV needs the columns case,source,target")
    names = [r["case"] or "" for r in rows]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{path}: case names must be non-empty and unique")
    for line, name in enumerate(names, start=2):
        try:
            safe_component(name, f"{path} line {line}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return [Job(r["case"], path.parent / r["source"], target=path.parent / r["target"]) for r in rows]


def split_cases(names: Sequence[str], *, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (training, validation) split; with a `val_fraction` above 0, ≥ 1 validation case
    once there are ≥ 2 cases (0: every case trains).

    Cases are ordered by a hash of (seed, name), so a case keeps its side when others are added.
    """
    ordered = sorted(names, key=lambda n: hashlib.sha1(f"{seed}:{n}".encode()).hexdigest())
    wanted = max(1, round(val_fraction * len(names))) if val_fraction > 0 else 0
    n_val = 0 if len(names) < 2 else min(len(names) - 1, wanted)
    return sorted(ordered[n_val:]), sorted(ordered[:n_val])


def _write_outputs(rows: list[CaseResult], extra: list[CaseResult], output_dir: Path, meta: dict,
                   val_fraction: float, seed: int, report: Path) -> None:  # fmt: skip
    """datalist.json of every finished case (`rows` and `extra`), `report` of `rows`."""
    done = {r.case: r.files for r in rows + extra if r.status in ("ok", "skipped")}
    training, validation = split_cases(list(done), val_fraction=val_fraction, seed=seed)

    def entries(names: list[str]) -> list[dict]:
        return [{key: f"{n}/{f}" for key, f in done[n].items()} for n in names]

    datalist = {**meta, "training": entries(training), "validation": entries(validation)}
    atomic_write_text(output_dir / "datalist.json", json.dumps(datalist, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REPORT_FIELDS)
    writer.writerows((r.case, r.source, r.status, r.message) for r in rows)
    atomic_write_text(report, buffer.getvalue())


def _check_usage(input_dir: Path, output_dir: Path, task: str, factors: Sequence[int], workers: int,
                 simulate_kernel: bool, pairs_csv: Path | None,
                 val_fraction: float) -> tuple[int, int, int]:  # fmt: skip
    if task not in TASKS:
        raise ConfigError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if not input_dir.is_dir():
        raise ConfigError(f"{input_dir}: input folder not found")
    if input_dir.resolve().is_relative_to(output_dir.resolve()):
        raise ConfigError(f"{output_dir}: the output folder must not be or contain the input folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: exists and is not a folder")
    try:
        check_output_location(output_dir)
        parsed = parse_factors(factors)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if workers < 1:
        raise ConfigError(f"workers {workers}: need at least 1")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"validation fraction {val_fraction:g}: expected 0 (no validation case) to below 1")
    if (simulate_kernel or pairs_csv is not None) and task != "ct-kernel":
        raise ConfigError("--simulate-kernel and --pairs apply to --task ct-kernel only")
    if pairs_csv is not None and not pairs_csv.is_file():
        raise ConfigError(f"{pairs_csv}: pairs CSV not found")
    return parsed


def preprocess(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    task: str,
    window: WindowSpec | None = None,
    factors: Sequence[int] = DEFAULT_FACTORS,
    workers: int = 1,
    overwrite: bool = False,
    pairs_csv: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    simulate_kernel: bool = False,
    tilt: str = "correct",
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> PreprocessReport:
    """Preprocess every case under `input_dir` into `output_dir` (see the module docstring).

    Usage errors (missing or empty folder, bad task/window/factors) raise `ConfigError`; failures of
    single cases are rows with status "failed" in the report. The datalist records the experiment spec
    (`revgan_med.tasks.TaskSpec`: task, channels, `window` — None: the task's default — and factors),
    which `train` checks its config against. `tilt`: gantry-tilted CT series are resampled onto an
    orthogonal grid ("correct") or fail ("refuse"). `shard` (i, n) makes only the i-th of n slices of
    the cases (sorted by name) and writes ``report.shard<i>of<n>.csv``; the datalist lists every
    finished case.
    """
    from tqdm import tqdm

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    pairs = Path(pairs_csv) if pairs_csv is not None else None
    f = _check_usage(input_dir, output_dir, task, factors, workers, simulate_kernel, pairs, val_fraction)
    try:
        spec = TaskSpec.create(task, window=window, factors=f)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if tilt not in TILT_MODES:
        raise ConfigError(f"tilt {tilt!r}: expected one of {', '.join(TILT_MODES)}")
    settings = Settings(task, f, simulate_kernel, tilt)
    every = find_jobs(input_dir, output_dir, task=task, pairs_csv=pairs, simulate_kernel=simulate_kernel)
    if not every:
        raise ConfigError(
            f"{pairs or input_dir}: no NIfTI file or DICOM series found (nothing to preprocess)"
        )
    every.sort(key=lambda j: j.case)
    jobs = shard_items(every, *shard)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[CaseResult] = []
    bar = tqdm(total=len(jobs), desc="preprocess", unit="case", disable=not progress)
    if workers == 1:
        for job in jobs:
            rows.append(process_case(job, settings, output_dir, overwrite))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(process_case, j, settings, output_dir, overwrite): j for j in jobs}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    rows.append(future.result())
                except Exception as exc:  # a crashed worker process fails its case, not the batch
                    rows.append(CaseResult(job.case, job.label, "failed", f"worker crashed: {exc}"))
                bar.update()
    bar.close()
    others = [j for j in every if j not in jobs]
    rows.sort(key=lambda r: r.case)
    meta = {"spec": spec.to_dict(), "simulated_kernel": simulate_kernel}
    report = output_dir / ("report.csv" if shard[1] == 1 else f"report.shard{shard[0]}of{shard[1]}.csv")
    extra = _done_elsewhere(others, settings, output_dir)
    _write_outputs(rows, extra, output_dir, meta, val_fraction, seed, report)
    return PreprocessReport(rows, output_dir / "datalist.json", report)


def _done_elsewhere(jobs: list[Job], settings: Settings, output_dir: Path) -> list[CaseResult]:
    """Other shards' cases that are finished with these settings (their inputs are theirs to check)."""
    rows = []
    for job in jobs:
        files = _finished(output_dir / job.case, _provenance(job, settings))
        if files is not None:
            rows.append(CaseResult(job.case, job.label, "skipped", "done by another shard", files))
    return rows
