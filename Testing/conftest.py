"""Shared fixtures: the real sample data in ../shared/data (or $HFSAM_DATA)."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HFSAM_DATA", REPO.parent / "shared" / "data"))

# Tests never need more threads than CI has cores; more only thrashes.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"sample data not found at {DATA} (set HFSAM_DATA)")
    return DATA


@pytest.fixture(scope="session")
def ct3mm(data_dir) -> Path:
    return data_dir / "ct_abdomen_3mm"


@pytest.fixture(scope="session")
def ctdicom(data_dir) -> Path:
    return data_dir / "ct_abdomen_dicom"


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process training on one thread, like the child processes: on 2 shared CPU cores a second
    OpenMP thread mostly waits for the first, and bit-level comparisons want equal thread counts."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
