"""Where a run's metrics go: ``metrics.jsonl`` always (one JSON object per record, flushed), and
TensorBoard event files under ``<output_dir>/runs`` with ``train.report_to: tensorboard`` (the
``tensorboard`` extra; written offline), tagged as Trainer's TensorBoard callback tags them
(``train/loss``, ``eval/loss``, ...)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from offload.errors import OffloadError

TB_DIR = "runs"  # under the run folder, as Trainer's logging_dir default
_TAGS = {"eval_loss": "eval/loss"}


class MetricsLog:
    """Append-only metrics of one run; ``close()`` releases the file and the event writer."""

    def __init__(self, run_dir: Path, report_to: str, first_step: int = 1) -> None:
        self.run_dir = run_dir
        self.report_to = report_to
        self.first_step = first_step  # a resumed run's: TensorBoard forgets what it logged from there on
        self._file: Any = None
        self._tb: Any = None

    def open(self) -> MetricsLog:
        if self.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise OffloadError("train.report_to tensorboard needs the tensorboard package: "
                                   "pip install 'offload-train[tensorboard]', or set report_to: none") from None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=self.first_step)
        self._file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        return self

    def write(self, record: dict[str, Any]) -> None:
        # strict JSON: a non-finite value (a NaN loss under nan_policy: skip) is written as null
        self._file.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                     for k, v in record.items()}, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(_TAGS.get(key, f"train/{key}"), value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLog:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
