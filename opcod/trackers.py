"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and Trackio, through their own libraries."""
from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path

from .config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_installed(report_to) -> None:
    """Refuse, before any compute, a tracker whose library is missing."""
    for name in report_to:
        pkg = PACKAGES.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"config key 'logging.report_to' asks for {name}, but {pkg} is not installed "
                              f"(pip install 'opcod[trackers]')")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers (bools as 0/1; the names are flat already, see opcod/metrics.py, and any
    nesting is joined with '/'); text, lists, None and NaN left out."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[name] = float(value)
    return out


class Trackers:
    """The trackers named in logging.report_to other than jsonl (written by the trainer itself, as
    resume truncates it), on rank 0. A resumed run continues the same W&B and Trackio run."""

    def __init__(self, report_to, run_dir: Path, run_name: str, project: str, config: dict):
        check_installed(report_to)
        self.tb = self.wandb = self.trackio = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb
            # One id per run directory, kept there, so a resumed run appends to the same W&B run
            # (WANDB_MODE=offline is honoured by wandb itself).
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                                    config=config)
        if "trackio" in report_to:
            import trackio
            self.trackio = trackio.init(project=project, name=run_name, config=config, resume="allow")

    def log(self, record: dict, step: int) -> None:
        values = scalars({k: v for k, v in record.items() if k not in ("kind", "step")})
        if not values:
            return
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.trackio is not None:
            self.trackio.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.trackio is not None:
            self.trackio.finish()
