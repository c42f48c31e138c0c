"""Which Python packages the engine still needs inside Slicer, and how they would be installed.

Rules from the issue: check on first use (never at Slicer start-up or module
import), show the user exactly what would be installed, and install only after
they said yes. So this module has three separate steps:

1. ``missing_requirements()``: what is absent or too old (reads installed
   package metadata; imports nothing heavy);
2. ``plan_install(missing)``: an ``InstallPlan`` with the exact pip command and,
   for torch, whether the PyTorch extension's ``PyTorchUtils`` will do it (it
   picks the CUDA build that matches the computer, which plain pip cannot);
3. ``run_install(plan)``: does it, only when called (after the user agreed).

SimpleITK and numpy are part of Slicer and are never installed here: pip
replacing Slicer's own SimpleITK would break its IO.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from .engine_command import find_python

# What the engine imports (pyproject.toml), minus what Slicer ships.
ENGINE_REQUIREMENTS = (
    "torch>=2.1",
    "torchvision>=0.16",  # segment_anything imports it
    "segment-anything>=1.0",
    "safetensors>=0.4",
)
PROVIDED_BY_SLICER = ("SimpleITK", "numpy")
TORCH_PACKAGES = ("torch", "torchvision")


@dataclass(frozen=True)
class Missing:
    requirement: str  # e.g. "safetensors>=0.4"
    name: str  # distribution name, e.g. "safetensors"
    installed: str | None  # installed version when it is too old, else None

    def describe(self) -> str:
        return f"{self.requirement} (installed: {self.installed})" if self.installed else f"{self.requirement} (not installed)"


def missing_requirements(
    requirements: Sequence[str] = ENGINE_REQUIREMENTS,
    version_of: Callable[[str], str] = importlib.metadata.version,
) -> list[Missing]:
    """Requirements that are not installed, or installed in a version outside the specifier."""
    missing = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise ValueError(f"bad requirement {text!r}: {exc}") from exc
        try:
            installed = version_of(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(Missing(text, req.name, None))
            continue
        try:
            ok = Version(installed) in req.specifier if req.specifier else True
        except InvalidVersion:
            ok = True  # a local build with an odd version string: trust it rather than reinstall
        if not ok:
            missing.append(Missing(text, req.name, installed))
    return missing


@dataclass
class InstallPlan:
    """What would be installed; shown to the user before anything happens."""

    missing: list[Missing]
    pip_command: list[str] = field(default_factory=list)  # empty when pip has nothing to do
    torch_via_pytorch_utils: bool = False
    torch_requirement: str | None = None

    @property
    def empty(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        """The text of the confirmation dialog."""
        if self.empty:
            return "All packages HF-SAM needs are installed."
        lines = ["HF-SAM needs these Python packages in Slicer's Python environment:"]
        lines += [f"  - {m.describe()}" for m in self.missing]
        if self.torch_via_pytorch_utils:
            lines.append(
                f"PyTorch ({self.torch_requirement}) will be installed by the PyTorch extension, "
                "which picks the build for this computer's GPU (or the CPU)."
            )
        if self.pip_command:
            lines.append("Then this command runs:")
            lines.append("  " + shlex.join(self.pip_command))
        lines.append("This downloads from the internet and can take several minutes. Install now?")
        return "\n".join(lines)


def plan_install(
    missing: Sequence[Missing],
    *,
    python: str | None = None,
    torch_utils_available: bool = False,
) -> InstallPlan:
    """The plan for ``missing``; torch goes through PyTorchUtils when the PyTorch extension is installed.

    ``python`` defaults to the interpreter the engine runs in (PythonSlicer inside Slicer).
    """
    python = python or find_python()
    missing = list(missing)
    torch_missing = [m for m in missing if m.name.lower() in TORCH_PACKAGES]
    via_utils = bool(torch_missing) and torch_utils_available
    pip_requirements = [m.requirement for m in missing if not (via_utils and m.name.lower() in TORCH_PACKAGES)]
    command = [python, "-m", "pip", "install", *pip_requirements] if pip_requirements else []
    torch_req = next((m.requirement for m in torch_missing if m.name.lower() == "torch"), None)
    return InstallPlan(missing, command, via_utils, torch_req or (torch_missing[0].requirement if torch_missing else None))


def pytorch_utils_logic():
    """The PyTorch extension's logic object, or None when that extension is not installed."""
    try:
        import PyTorchUtils  # noqa: PLC0415 - only exists inside Slicer with the PyTorch extension
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def run_install(
    plan: InstallPlan,
    *,
    torch_logic=None,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    log: Callable[[str], None] = print,
) -> None:
    """Install what ``plan`` lists. Call only after the user agreed. Raises RuntimeError on failure."""
    if plan.empty:
        return
    if plan.torch_via_pytorch_utils:
        if torch_logic is None:
            torch_logic = pytorch_utils_logic()
        if torch_logic is None:
            raise RuntimeError("the PyTorch extension is not available any more; install it from the Extensions Manager")
        spec = str(Requirement(plan.torch_requirement).specifier) if plan.torch_requirement else ""
        log(f"Installing PyTorch {spec} through the PyTorch extension...")
        if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=spec) is None:
            raise RuntimeError("the PyTorch extension could not install PyTorch; see the Python console for details")
    if plan.pip_command:
        log("Running: " + shlex.join(plan.pip_command))
        done = run(plan.pip_command, capture_output=True, text=True)
        if done.stdout:
            log(done.stdout)
        if done.returncode != 0:
            tail = (done.stderr or "").strip().splitlines()[-5:]
            raise RuntimeError(f"pip install failed (exit code {done.returncode}): " + " | ".join(tail))
