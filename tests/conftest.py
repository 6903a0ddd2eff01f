"""Shared fixtures: generic helpers only (CPU, temporary directories)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from offload.io.posix import PosixBackend


@pytest.fixture
def posix_backend_factory() -> Iterator[Callable[..., PosixBackend]]:
    """Build ``PosixBackend(**kwargs)`` instances; every one is closed at teardown."""
    made: list[PosixBackend] = []

    def make(**kwargs: Any) -> PosixBackend:
        backend = PosixBackend(**kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def torch_gen() -> torch.Generator:
    """A seeded CPU generator, so random test data is the same on every run."""
    return torch.Generator().manual_seed(1234)
