"""Shared fixtures and the test lanes.

Data: the real sample data in ../shared/data (or $HFSAM_DATA). Where it is absent, the sample
CT comes from the engine's own fetcher (store/sample_data.locate_sample: the public files,
SHA256-checked), cached in $HFSAM_TEST_CACHE (default ~/.cache/hfsam-tests); only the DICOM
series, which has no public download, then skips, saying so.

Lanes, as markers set here from what a test uses (``pytest -m unit`` for a fast loop):
``data`` (reads the sample volumes), ``process`` (starts engine processes), ``unit`` (neither).
"""

import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HFSAM_DATA", REPO.parent / "shared" / "data"))

# Tests never need more threads than CI has cores; more only thrashes. Under pytest-xdist (`-n 2`,
# as `make test` runs) each of the two workers gets one core: two OpenMP threads per worker on 2 cores
# made small models spin-wait for each other, up to 50x slower. The workers inherit the controller's
# environment, so a value this file chose in the controller is marked and chosen again in each worker;
# only a user's own OMP_NUM_THREADS is kept (an empty one means none: OpenMP ignores it).
_THREADS_CHOSEN_HERE = "HFSAM_TEST_THREADS_CHOSEN"
if not os.environ.get("OMP_NUM_THREADS", "").strip():
    os.environ[_THREADS_CHOSEN_HERE] = "1"
if os.environ.get(_THREADS_CHOSEN_HERE):
    os.environ["OMP_NUM_THREADS"] = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


SAMPLE = "ct_abdomen_3mm"
CACHE = Path(os.environ.get("HFSAM_TEST_CACHE", Path.home() / ".cache" / "hfsam-tests"))


@pytest.fixture(scope="session")
def ct3mm() -> Path:
    """The folder with image.nii.gz and labels_synapse8.nii.gz of the 3 mm sample CT."""
    shared = DATA / SAMPLE
    if (shared / "image.nii.gz").is_file() and (shared / "labels_synapse8.nii.gz").is_file():
        return shared
    from HFSAMCore.errors import InputError
    from HFSAMCore.store.sample_data import locate_sample

    try:
        found = locate_sample(data_dir=DATA, library_root=CACHE, name=SAMPLE)
    except InputError as exc:
        pytest.skip(f"no sample data at {DATA} and the sample fetcher failed: {exc}")
    return Path(found["image"]).parent


@pytest.fixture(scope="session")
def data_dir(ct3mm) -> Path:
    """The folder holding the sample folders (ct_abdomen_3mm, and ct_abdomen_dicom where it exists)."""
    return ct3mm.parent


@pytest.fixture(scope="session")
def ctdicom() -> Path:
    folder = DATA / "ct_abdomen_dicom"
    if not (folder / "dicom").is_dir():
        pytest.skip(f"the DICOM sample is not at {folder} (it has no public download; set HFSAM_DATA)")
    return folder


_DATA_FIXTURES = {"ct3mm", "ctdicom", "data_dir"}
_PROCESS_FIXTURES = {"python_exe", "repo_root"}


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & _DATA_FIXTURES:
            item.add_marker(pytest.mark.data)
        if used & _PROCESS_FIXTURES or "subprocess" in getattr(item.module, "__dict__", {}):
            item.add_marker(pytest.mark.process)
        if not used & _DATA_FIXTURES and not item.get_closest_marker("process"):
            item.add_marker(pytest.mark.unit)


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


@pytest.fixture
def cli_main(monkeypatch):
    """cli.main in this process (the tiny model costs no process start), its signal handlers undone after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setenv("HFSAM_HOME", "/nonexistent/hfsam-library")
    from HFSAMCore.cli import app as cli

    yield lambda argv: cli.main([str(a) for a in argv])
    for s, h in handlers.items():
        signal.signal(s, h)


def pytest_terminal_summary(terminalreporter, config):
    """One line on the machine, at the end where CI logs show it: the suite's times depend on it."""
    import torch

    from HFSAMCore.bench.common import machine_info

    info = machine_info(torch.device("cpu"))
    workers = getattr(config.option, "numprocesses", None)
    workers = workers if isinstance(workers, int) else 0  # absent without pytest-xdist
    threads = os.environ.get("OMP_NUM_THREADS")
    if workers and os.environ.get(_THREADS_CHOSEN_HERE):
        threads = "1"
    terminalreporter.write_line(
        f"machine: {info['cpu']}; bf16 instructions: {info['bf16_instructions']}; torch {info['torch']} "
        f"({info['cpu_capability']}); {max(workers, 1)} test process(es) with OMP_NUM_THREADS={threads}"
    )
