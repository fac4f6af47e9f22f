"""Training logs: ``RUN_DIR/metrics.csv``, TensorBoard scalars and images, and a tqdm progress bar.

metrics.csv has a ``step`` column and one column per loss or metric, one row per logged step (empty
cells where a value was not logged at that step, e.g. validation metrics between validations). A
resumed run first drops the rows after its checkpoint's step, so the file reads as one run.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from revgan_med.io.atomic import atomic_write_text


def _read_rows(path: Path, *, up_to: int) -> tuple[list[str], list[dict[str, str]]]:
    """Rows of an existing metrics.csv with step <= `up_to` (a torn last line from a kill is dropped)."""
    if not path.is_file():
        return [], []
    reader = csv.DictReader(io.StringIO(path.read_text()))
    columns = [c for c in (reader.fieldnames or []) if c != "step"]
    rows = []
    for row in reader:
        try:
            step = int(row.get("step") or "")
        except ValueError:
            continue
        if step <= up_to and None not in row.values():
            rows.append(row)
    return columns, rows


class RunLogger:
    """Writes metrics.csv, TensorBoard events and a progress bar; silent when ``enabled`` is False.

    Args:
        run_dir: the run folder (``metrics.csv`` and ``tensorboard/`` go there).
        start_step: the step training starts from (0, or the resumed checkpoint's step).
        total_steps: for the progress bar.
        enabled: False on every rank but 0 of a distributed run.
    """

    def __init__(self, run_dir: Path, *, start_step: int, total_steps: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] = []
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.columns, self.rows = _read_rows(self.path, up_to=start_step)
        self._rewrite()
        # purge_step hides events a killed run wrote after the checkpoint it is resumed from
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _rewrite(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["step", *self.columns], restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One metrics.csv row and TensorBoard scalars for ``step``."""
        if not self.enabled or not values:
            return
        row = {"step": str(step), **{k: f"{float(v):.6g}" for k, v in values.items()}}
        self.rows.append(row)
        new = [k for k in values if k not in self.columns]
        if new:  # a new column: rewrite the whole file (atomically) with the wider header
            self.columns.extend(new)
            self._rewrite()
        else:
            with self.path.open("a") as handle:
                csv.DictWriter(
                    handle, fieldnames=["step", *self.columns], restval="", lineterminator="\n"
                ).writerow(row)
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), step)

    def images(self, step: int, tag: str, panels: list[np.ndarray]) -> None:
        """Show 2D slices side by side (e.g. input | output | target), each scaled to [0, 1] jointly."""
        if not self.enabled:
            return
        strip = np.concatenate([np.asarray(p, dtype=np.float32) for p in panels], axis=1)
        lo, hi = float(strip.min()), float(strip.max())
        strip = (strip - lo) / (hi - lo) if hi > lo else np.zeros_like(strip)
        self.writer.add_image(tag, strip[None], step)

    def progress(self, steps: int = 1, postfix: Mapping[str, float] | None = None) -> None:
        if not self.enabled:
            return
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def note(self, line: str) -> None:
        """A line on stderr above the progress bar (rank 0 only)."""
        if self.enabled:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
