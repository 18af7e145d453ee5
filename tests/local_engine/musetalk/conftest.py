"""Shared by the MuseTalk tests: tiny networks run on one intra-op thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread per test module: tiny tensors gain nothing from a thread pool, and
    on a busy 2-core machine every parallel op waits for it (up to 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
