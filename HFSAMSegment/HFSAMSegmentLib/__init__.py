"""The HF-SAM Segment module's logic, kept out of HFSAMSegment.py so CI can test it without Slicer.

- engine_command:  where the engine is, and the argv of every engine command
- child_process:   how children start (no console window on Windows, own process group)
- parent_watch:    a script the engine runs under: it stops when Slicer exits or crashes
- process_runner:  the child process: progress JSON lines in, Cancel (process tree) out
- progress_parser: one stdout line -> event dict or None (never raises)
- mrml_adapter:    volume/segmentation nodes <-> engine files (MRML, no GUI)
- terminology:     class name -> SNOMED terminology entry (Resources/HFSAM.term.json)
- jobs:            Segment and Fine-tune: export, run, import, clean up
- backbones:       the backbones offered, from the engine's torch-free registry
- library_bridge:  the model library through ``python -m HFSAMCore models ...``
- installer:       missing Python packages, what would be installed, install on request
- logic:           the module's logic without GUI (HFSAMSegmentLogic = this + Slicer's base)
- panel:           the panel's behaviour (HFSAMSegmentWidget = this + the .ui)
- library_section: the panel's Model library section (adapters, base checkpoints)
- parameters:      the parameter node (Slicer only)
- slicer_host:     dialogs, timers, settings of the Slicer application (Slicer only)
- selftest:        scenarios shared by the pytest suite and Slicer's self-test

Nothing here imports Qt except slicer_host, and this file imports nothing at
import time, so importing one piece (e.g. progress_parser in a test) does not
pull in MRML or SimpleITK.
"""

# Leaves first: a module is reloaded after everything it imports.
RELOAD_ORDER = (
    "errors",
    "child_process",
    "progress_parser",
    "engine_command",
    "process_runner",
    "backbones",
    "terminology",
    "mrml_adapter",
    "jobs",
    "library_bridge",
    "installer",
    "logic",
    "selftest",
    "parameters",
    "library_section",
    "panel",
    "slicer_host",
)


def reload_all() -> None:
    """Reload the loaded pieces, dependencies first (the module's "Reload" in developer mode)."""
    import importlib
    import sys

    for name in RELOAD_ORDER:
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None:
            importlib.reload(module)
