"""Export a trained generator as one artefact a colleague can run without the training run folder.

``model``: one weights-only file with the generator's weights, the experiment spec (config, intensity
mapping, task) and a model card (`model_card`); `revgan_med.inference.load_model` reads it like a
checkpoint, ``train --resume`` refuses it. ``torchscript``: forward and inverse as one TorchScript
module, runnable with plain PyTorch. The MONAI bundle format lives in `revgan_med.bundle`.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from revgan_med import __version__
from revgan_med.checkpoints import (
    MODEL_FORMAT,
    build_generator_from_config,
    checkpoint_config,
    checkpoint_spec,
    generator_from_checkpoint,
    load_checkpoint,
)
from revgan_med.data.datasets import load_datalist
from revgan_med.data.transforms import intensity_from_dict
from revgan_med.errormap import calibration, transformed_outputs, tta_transforms
from revgan_med.io.atomic import atomic_path, atomic_write_text
from revgan_med.tasks import TASK_CHANNELS
from revgan_med.training.validation import METRICS, ValidationSet

UNSET_LICENCE = "unspecified: the model's owner fills this in"
# what only `train --resume` needs: never part of an exported model
TRAINING_ONLY = ("optimizers", "schedulers", "scaler", "rng", "objective_state", "data_position",
                 "training_generator", "ema_updates")


def _scanner_info(source: Path) -> dict[str, str]:
    """Manufacturer and reconstruction kernel of a source scan: a DICOM header, or a dcm2niix sidecar."""
    if source.is_dir():
        import pydicom

        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(file, stop_before_pixels=True)
            except Exception:  # not DICOM (a licence, a sidecar): try the next file
                continue
            return _vendor_kernel(ds.get)
        return {}
    stem = source.name.split(".")[0]  # dcm2niix's sidecar; a cropped copy keeps the name as a prefix
    for sidecar in sorted(source.parent.glob("*.json"), key=lambda p: -len(p.stem)):
        if stem.startswith(sidecar.stem):
            return _vendor_kernel(json.loads(sidecar.read_text()).get)
    return {}


def _vendor_kernel(get: Any) -> dict[str, str]:
    return {"vendor": str(get("Manufacturer", "")), "kernel": str(get("ConvolutionKernel", ""))}


def _case_sources(case_json: Path) -> list[Path]:
    """The scans a preprocessed case was made from (its ``case.json`` "source": ``A [(series S)] [-> B]``)."""
    label = json.loads(case_json.read_text()).get("source", "") if case_json.is_file() else ""
    return [Path(part.split(" (series ")[0].strip()) for part in str(label).split(" -> ") if part.strip()]


def training_data_summary(datalist: str | Path) -> dict[str, Any]:
    """Case count, voxel spacings and scanner vendors/kernels of a datalist's training cases.

    Spacings come from the targets' NIfTI headers; vendors and kernels from each case's source scan
    (named in the ``case.json`` that `preprocess` writes) where that scan is still readable.
    """
    import nibabel as nib

    try:
        items = load_datalist(datalist, "training")
    except ValueError as exc:
        return {"note": f"training data not readable at export ({str(exc).split(': ', 1)[-1]})"}
    spacings, vendors, kernels = set(), set(), set()
    for item in items:
        target = Path(item["target"])
        if target.is_file():
            zooms = nib.load(target).header.get_zooms()[:3]
            spacings.add(tuple(round(float(z), 3) for z in zooms))
        for source in _case_sources(target.parent / "case.json"):
            info = _scanner_info(source) if source.exists() else {}
            vendors.update(v for v in [info.get("vendor")] if v)
            kernels.update(k for k in [info.get("kernel")] if k)
    return {
        "cases": len(items),
        "voxel_spacings_mm": [list(s) for s in sorted(spacings)],
        "vendors": sorted(vendors) or "unknown (no DICOM header or sidecar)",
        "kernels": sorted(kernels) or "unknown (no DICOM header or sidecar)",
    }


def validation_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """Model vs the classical baseline training validates against (`ValidationSet`: tricubic for
    super-resolution, the linear filter of the model's linear path or the input for kernels) on the
    datalist's validation cases."""
    import warnings

    config = checkpoint_config(payload)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cases = ValidationSet.from_config(config, intensity_from_dict(payload["intensity"]))
        except ValueError:
            cases = None
    if cases is None:
        return {"note": "no validation cases (none in the training datalist, or not readable at export)"}
    generator, _ = generator_from_checkpoint(payload)
    scores = cases.evaluate(generator, device=torch.device("cpu"))
    summary: dict[str, Any] = {"cases": len(cases.cases)}
    for direction in cases.directions:  # a kernel model: X → Y and Y → X (``inverse``)
        prefix, name = ("", "") if direction == "forward" else ("inverse_", f" ({direction})")
        summary[f"model{name}"] = {k: scores[f"{prefix}{k}"] for k in METRICS}
        summary[f"baseline{name}: {cases.baseline}"] = {k: scores[f"{prefix}baseline_{k}"] for k in METRICS}
    summary["psnr_margin_db"] = scores["psnr_margin"]  # the mean over the directions, as best.pt is chosen
    if TASK_CHANNELS[config.task] == 1:
        summary["error_map_calibration"] = _calibration(cases, generator, config)
    return summary


def _calibration(cases: Any, generator: torch.nn.Module, config: Any) -> dict[str, float]:
    """`revgan_med.errormap.calibration` of the error map on the validation cases (mean over cases)."""
    transforms = tta_transforms(config.data.factors, config.data.patch_size)

    def predict(a: np.ndarray) -> np.ndarray:
        return cases.predict(generator, a[None], device=torch.device("cpu"))[0]

    rows = []
    for case in cases.cases:
        image, mapping = case["image"][0], case["mapping"]
        prediction = predict(image)
        emap = transformed_outputs(predict, image, prediction, transforms).std(axis=0)
        reference = mapping.denormalize(case["target"][0])
        rows.append(calibration(emap, mapping.denormalize(prediction), reference))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _finite(payload: dict[str, Any]) -> bool:
    best = payload.get("best_metric") or {}
    return isinstance(best.get("value"), (int, float)) and np.isfinite(best["value"])


def model_card(payload: dict[str, Any], *, licence: str | None = None) -> dict[str, Any]:
    """What a receiver needs to judge the model: what it was trained on, how it scored, versions."""
    config, spec = checkpoint_config(payload), checkpoint_spec(payload)
    m = config.model
    return {
        "name": f"{m.generator} {spec.task}",
        "task": spec.task,
        "objective": config.objective,
        "generator": {
            "name": m.generator,
            "width": m.width,
            "depth": m.depth,
            "residual": m.residual,
            "linear_kernel": m.linear_kernel,
        },  # fmt: skip
        "intensity": dict(payload["intensity"]),
        "factors": list(spec.factors),
        "upsample": spec.upsample,
        "patch_size": list(spec.patch_size),
        # what `infer` writes unless told otherwise (the validation scores are single passes)
        "output": "flip self-ensemble (5 passes)" if config.infer.ensemble else "one pass",
        "steps": int(payload.get("step", 0)),
        "best_validation": payload.get("best_metric") if _finite(payload) else "none (no validation run)",
        "training_data": training_data_summary(config.data.datalist),
        "validation": validation_summary(payload),
        "versions": {
            "revgan_med": __version__,
            "torch": str(torch.__version__),
            "monai": monai.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "licence": licence or UNSET_LICENCE,
        "intended_use": "research; outputs are derived images that can invent or remove structures, "
        "not for diagnosis",
    }


def card_markdown(card: dict[str, Any]) -> str:
    """The model card as Markdown: one bullet per field, a sub-heading per nested section."""
    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    lines = [f"# Model card: {card['name']}", ""]
    lines += [f"- {k.replace('_', ' ')}: {text(v)}" for k, v in card.items() if not isinstance(v, dict)]
    for key, section in ((k, v) for k, v in card.items() if isinstance(v, dict)):
        lines += ["", f"## {key.replace('_', ' ')}", ""]
        lines += [f"- {k}: {text(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n"


def exported_payload(checkpoint: str | Path, *, licence: str | None = None,
                     card: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """A checkpoint reduced to the generator's weights, its spec and a model card (`card` extends it)."""
    payload = load_checkpoint(checkpoint, exported_ok=True)
    out = {k: v for k, v in payload.items() if k not in TRAINING_ONLY}
    out["models"] = {"generator": payload["models"]["generator"]}
    out["format"] = MODEL_FORMAT
    earlier = payload.get("card", {})  # re-exporting an exported model keeps its licence unless given
    licence = licence or (earlier.get("licence") if earlier.get("licence") != UNSET_LICENCE else None)
    out["card"] = {**earlier, **model_card(payload, licence=licence), **(card or {})}
    return out


def export_model(checkpoint: str | Path, output: str | Path, *, licence: str | None = None,
                 card: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write the exported model file `output` and its card beside it (``<output stem>.card.md``)."""
    output = Path(output)
    payload = exported_payload(checkpoint, licence=licence, card=card)
    with atomic_path(output) as tmp:
        torch.save(payload, tmp)
    atomic_write_text(card_path(output), card_markdown(payload["card"]))
    return output


def card_path(model_file: Path) -> Path:
    """Where `export_model` writes the Markdown card of `model_file`."""
    return model_file.with_name(model_file.name.split(".")[0] + ".card.md")


class _BothDirections(torch.nn.Module):
    """Scriptable wrapper: ``forward`` is the generator's X→Y, ``inverse`` its Y→X."""

    def __init__(self, forward_fn: torch.jit.ScriptModule, inverse_fn: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.f, self.g = forward_fn, inverse_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)

    @torch.jit.export
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.g(y)


def export_torchscript(checkpoint: str | Path, output: str | Path,
                       example_size: Sequence[int] | None = None) -> Path:  # fmt: skip
    """Trace forward and inverse (network units, (B, C, X, Y, Z)) into one TorchScript file.

    Traced on a patch-sized example with plain autograd (`memory_saving` only changes training memory,
    not the outputs); the spec and card travel in the file's ``extra_files`` as ``spec.json``.
    """
    output = Path(output)
    payload = exported_payload(checkpoint)
    config = checkpoint_config(payload)
    config.model.memory_saving = False  # tracing records plain ops; same parameters and outputs
    generator = build_generator_from_config(config)
    if config.objective == "self-inverse":
        from revgan_med.networks.selfinverse import SelfInverseGenerator

        generator = SelfInverseGenerator.from_generator(generator)
    generator.load_state_dict(payload["models"]["generator"])
    generator.eval()
    size = list(example_size or config.data.patch_size)
    example = torch.randn(1, TASK_CHANNELS[config.task], *size)
    with torch.no_grad():
        f = torch.jit.trace(_Direction(generator, inverse=False), example, check_trace=False)
        g = torch.jit.trace(_Direction(generator, inverse=True), example, check_trace=False)
        scripted = torch.jit.script(_BothDirections(f, g))
    spec = {k: payload[k] for k in ("config", "intensity", "card") if k in payload}
    spec["traced_size"] = size  # padding to the generator's stride was recorded for this size
    with atomic_path(output) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={"spec.json": json.dumps(spec, default=_plain)})
    return output


class _Direction(torch.nn.Module):
    """One direction of a generator as a module's ``forward`` (what `torch.jit.trace` records)."""

    def __init__(self, generator: torch.nn.Module, *, inverse: bool) -> None:
        super().__init__()
        self.generator, self.is_inverse = generator, inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator.inverse(x) if self.is_inverse else self.generator(x)


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else str(value)
