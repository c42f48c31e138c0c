"""The Windows paths that can be checked on Linux: process creation flags, file flags, path handling.

No Windows machine runs CI, so these tests check what Windows would see: the flags every child
process gets (no console window), that no fsync is ever done on a read-only handle (Windows'
_commit fails with EBADF there; emulated here by refusing fsync on a read-only descriptor, which
Linux itself allows), and that the kill of a process tree asks taskkill for the tree, hidden.
"""

from __future__ import annotations

import ast
import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LIB_DIR = REPO / "HFSAMSegment" / "HFSAMSegmentLib"
sys.path.insert(0, str(REPO / "HFSAMSegment"))

from HFSAMSegmentLib import child_process, process_runner  # noqa: E402
from HFSAMSegmentLib.child_process import CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW, popen_options  # noqa: E402


def test_children_get_no_console_window_on_windows_and_their_own_group_where_asked():
    assert popen_options(platform="win32") == {"creationflags": 0x08000000}
    assert popen_options(platform="win32", own_group=True) == {"creationflags": 0x08000200}
    assert CREATE_NO_WINDOW == 0x08000000 and CREATE_NEW_PROCESS_GROUP == 0x00000200  # the Win32 values
    assert popen_options(platform="linux", own_group=True) == {"start_new_session": True}
    assert popen_options(platform="darwin") == {}


def test_on_windows_the_window_is_also_hidden_through_startupinfo(monkeypatch):
    class STARTUPINFO:  # noqa: N801 - subprocess.STARTUPINFO exists only on Windows
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    monkeypatch.setattr(subprocess, "STARTUPINFO", STARTUPINFO, raising=False)
    info = popen_options(platform="win32")["startupinfo"]
    assert info.dwFlags & child_process.STARTF_USESHOWWINDOW and info.wShowWindow == child_process.SW_HIDE


def _subprocess_calls(tree):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "subprocess"
            and node.func.attr in ("Popen", "run", "call", "check_call", "check_output")
        ):
            yield node


def test_every_child_process_of_the_module_takes_the_hidden_window_options():
    calls = 0
    for path in sorted(LIB_DIR.glob("*.py")):
        for call in _subprocess_calls(ast.parse(path.read_text(encoding="utf-8"))):
            calls += 1
            spread = [k.value for k in call.keywords if k.arg is None]
            assert any(isinstance(v, ast.Call) and getattr(v.func, "id", "") == "popen_options" for v in spread), (
                f"{path.name}:{call.lineno}: subprocess.{call.func.attr} without **popen_options(...)"
            )
    assert calls >= 3  # runner, taskkill, library command


def test_cancel_on_windows_kills_the_tree_with_a_hidden_taskkill(monkeypatch):
    runs = []
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(process_runner.subprocess, "run", lambda argv, **kw: runs.append((argv, kw)))

    class Child:  # the started child, as Popen returns it
        pid = 4242

        @staticmethod
        def poll():
            return None

    runner = process_runner.ProcessRunner(["x"])
    runner._proc = Child()
    runner.cancel()
    ((argv, kwargs),) = runs
    assert argv == ["taskkill", "/PID", "4242", "/T", "/F"]
    assert kwargs["creationflags"] == CREATE_NO_WINDOW and kwargs["stdin"] is subprocess.DEVNULL


@pytest.fixture()
def windows_fsync(monkeypatch):
    """os.fsync as on Windows: EBADF on a descriptor opened read-only."""
    real = os.fsync

    def fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return fsync


def test_the_emulation_fails_like_windows(windows_fsync, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with open(path, "rb") as handle, pytest.raises(OSError, match="Bad file descriptor"):
        os.fsync(handle.fileno())


def test_volume_export_and_the_engines_writes_never_fsync_a_read_only_handle(windows_fsync, tmp_path):
    slicer = pytest.importorskip("slicer")
    import SimpleITK as sitk

    from HFSAMCore.io.read import read_image
    from HFSAMCore.io.write import write_image
    from HFSAMSegmentLib import mrml_adapter, selftest

    scene, keep = selftest.make_bare_scene()
    node, array = selftest.make_volume(scene, shape=(3, 5, 6))
    folder = tmp_path / "Dossier patient é"  # a space and non-ASCII, as in a Windows user name
    folder.mkdir()
    written = mrml_adapter.export_volume(node, folder / "image.nrrd")
    image = read_image(written)
    assert np.array_equal(sitk.GetArrayFromImage(image), array)
    out = write_image(image, folder / "copy.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(read_image(out)), array)
    assert sorted(p.name for p in folder.iterdir()) == ["copy.nii.gz", "image.nrrd"]
    assert slicer is not None and keep
