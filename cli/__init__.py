"""The ``offload-train`` command line, and its Python API: ``OffloadEngine`` for a loop of your own,
``OffloadTrainer`` for a ``transformers.Trainer`` script, ``OffloadArguments`` for the budgets."""

from typing import Any

__all__ = ["OffloadArguments", "OffloadEngine", "OffloadTrainer"]


def __getattr__(name: str) -> Any:  # imported on first use: the command line starts without them
    if name in ("OffloadArguments", "OffloadEngine"):
        from cli import api

        return getattr(api, name)
    if name == "OffloadTrainer":
        from cli.trainer import OffloadTrainer

        return OffloadTrainer
    raise AttributeError(f"module 'cli' has no attribute {name!r}")
