"""The tensors in these tests are small: one intra-op thread is as fast, and stays fast on a loaded machine
(with 2 OpenMP threads and the cores busy elsewhere, each small op waits for a descheduled thread: the
suite took 40 s instead of 3 s)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
