"""Run metrics: one JSON record per line in `out_dir/metrics.jsonl`, TensorBoard scalars, and the
console lines."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch


class MetricsWriter:
    """Appends records (`{"kind": "train" | "eval" | "skipped" | "summary", ...}`) to a JSONL file,
    flushed per record so a crashed or running job can be read; with `tensorboard_dir`, the numeric
    fields of records that carry a `step` also go to TensorBoard as `kind/field`. A run starting
    afresh where a metrics file already is (e.g. train.resume=auto finding no checkpoint) renames
    that file aside (`set_aside`) instead of truncating it."""

    def __init__(self, path: Path, append: bool = False, tensorboard_dir: Optional[Path] = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if not append:
            set_aside(path)
        self._file = path.open("a" if append else "w")   # a resumed run continues the file
        self._board = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package
            self._board = SummaryWriter(str(tensorboard_dir))

    def write(self, kind: str, **fields: Any) -> None:
        self._file.write(json.dumps({"kind": kind, **fields}) + "\n")
        self._file.flush()
        if self._board is not None and "step" in fields:
            for name, value in fields.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._board.add_scalar(f"{kind}/{name}", value, fields["step"])
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def set_aside(path: Path) -> Optional[Path]:
    """Rename a non-empty `path` (metrics.jsonl) to the first free metrics.N.jsonl; returns the new name."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while (aside := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(aside)
    return aside


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"


def progress_line(step: int, steps: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float,
                  eta_s: float, mfu: float = 0.0) -> str:
    width = len(str(steps))
    mfu_part = f" | mfu {100 * mfu:.1f}%" if mfu > 0 else ""
    return (f"step {step:>{width}}/{steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
            f"{format_rate(tokens_per_s)} tok/s{mfu_part} | eta {format_duration(eta_s)}")


class Progress:
    """Loss and throughput since the last report, and the ETA of the run.

    Evaluation time is excluded from tokens/s (`exclude`) but stays in the ETA, which it is part of.
    """

    def __init__(self, steps: int, tokens_per_step: int) -> None:
        self.steps, self.tokens_per_step = steps, tokens_per_step
        self.start = self._mark = time.perf_counter()
        self._losses: list[float] = []
        self._pending: list = []   # losses still on the device, read together at the next report
        self._reported = 0

    def add(self, loss: Union[float, torch.Tensor]) -> None:
        self._pending.append(loss)

    @property
    def losses(self) -> list[float]:
        """Every step's loss so far (reads the pending ones from the device in one go)."""
        if self._pending:
            values = torch.stack([torch.as_tensor(v).detach().reshape(()).double() for v in self._pending])
            self._losses.extend(values.tolist())
            self._pending = []
        return self._losses

    def exclude(self, seconds: float) -> None:
        self._mark += seconds

    def report(self) -> dict[str, float]:
        losses = self.losses
        now, done = time.perf_counter(), len(losses)
        interval = losses[self._reported:]
        record = {
            "loss": sum(interval) / max(1, len(interval)),
            "tokens_per_s": len(interval) * self.tokens_per_step / max(now - self._mark, 1e-9),
            "eta_s": (now - self.start) / max(1, done) * (self.steps - done),
            "elapsed_s": now - self.start,
        }
        self._mark, self._reported = now, done
        return record
