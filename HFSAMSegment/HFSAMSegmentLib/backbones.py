"""The backbones the panel offers, read from the engine's own registry (HFSAMCore/model/registry.py).

The registry is the one list of backbones, their menu titles, input sizes and
checkpoints. It is torch-free on purpose, so the module imports that one file
in Slicer's process (cheaper than a child process, and right even before the
engine's packages are installed); nothing else of HFSAMCore is imported here.

HFSAMCore lies beside the module (installed extension: in qt-scripted-modules,
already on ``sys.path``; source tree: the repository root, which is put on
``sys.path`` only for this one import).
"""

from __future__ import annotations

import importlib
import sys

from .engine_command import find_engine_dir


def registry():
    """The ``HFSAMCore.model.registry`` module."""
    try:
        return importlib.import_module("HFSAMCore.model.registry")
    except ImportError:
        root = find_engine_dir()
        if root is None:
            raise
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("HFSAMCore.model.registry")
    finally:
        sys.path.remove(str(root))


def pretrained():
    """BackboneInfo of every backbone with real weights, in menu order (test-only backbones left out)."""
    reg = registry()
    return [reg.BACKBONES[name] for name in reg.pretrained_backbones() if not reg.BACKBONES[name].test_only]


def info(name: str):
    """BackboneInfo of ``name``, or None for an unknown name."""
    return registry().BACKBONES.get(name)


def default_backbone(installed_checkpoint_keys) -> str:
    """What a new adapter starts from: the paper's SAM ViT when its checkpoint is installed, else LiteMedSAM."""
    return registry().default_backbone(installed_checkpoint_keys)


def model_args(name: str) -> tuple[str, ...]:
    """Engine arguments that select backbone ``name``; a backbone with one input size gets it explicitly."""
    backbone = info(name)
    if backbone is None:
        raise ValueError(f"unknown backbone {name!r}")
    args = ("--backbone", name)
    if not backbone.any_img_size:
        args += ("--img-size", str(backbone.default_img_size))
    return args
