"""The suite's own set-up, where a mistake costs time on every CI run rather than a failure."""

import os

import pytest


def test_each_xdist_worker_computes_on_one_thread():
    """`make test` runs two workers on CI's two cores; a worker inheriting the controller's two threads
    made the small models spin-wait for each other (one test went from 1 s to 50 s)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not under pytest-xdist")
    if not os.environ.get("HFSAM_TEST_THREADS_CHOSEN"):
        pytest.skip("OMP_NUM_THREADS was set by the user, and is kept")
    import torch

    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert torch.get_num_threads() == 1
