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
