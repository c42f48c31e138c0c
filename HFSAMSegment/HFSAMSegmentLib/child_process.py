"""How every child process of the module is started: no console window on Windows, its own group.

Every ``subprocess`` call in HFSAMSegmentLib takes its options from
``popen_options()``, so no call can forget them (Testing/test_windows.py checks
each call site):

- Windows: ``PythonSlicer.exe`` and ``taskkill.exe`` are console programs, and a
  GUI application that starts one gets a console window flashing up, once per
  library refresh, pip step or cancel. ``CREATE_NO_WINDOW`` plus a STARTUPINFO
  that hides the window (what ``slicer.util.launchConsoleProcess`` does) keeps
  them invisible. ``CREATE_NEW_PROCESS_GROUP`` makes a long run its own group,
  so that taskkill /T reaches its children and Ctrl+C in Slicer's console does
  not reach it.
- POSIX: a long run gets its own session (process group), so that Cancel can
  signal the whole tree.

The flag values are the documented Win32 constants; they are spelled out here
because ``subprocess`` defines them only on Windows, and the tests run on Linux.
"""

from __future__ import annotations

import subprocess
import sys

CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def popen_options(*, own_group: bool = False, platform: str | None = None) -> dict:
    """Keyword arguments for ``subprocess.Popen``/``run`` on this (or the given) platform."""
    platform = platform or sys.platform
    if platform != "win32":
        return {"start_new_session": True} if own_group else {}
    options: dict = {"creationflags": CREATE_NO_WINDOW | (CREATE_NEW_PROCESS_GROUP if own_group else 0)}
    startupinfo_class = getattr(subprocess, "STARTUPINFO", None)  # only exists on Windows
    if startupinfo_class is not None:
        info = startupinfo_class()
        info.dwFlags |= STARTF_USESHOWWINDOW
        info.wShowWindow = SW_HIDE
        options["startupinfo"] = info
    return options
