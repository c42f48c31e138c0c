"""Slice and case lists, and the few-shot draws the literature makes from them."""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import InputError


def read_list(path: str | Path) -> list[str]:
    """Names in a list file: one per line; blank lines and '#' comments skipped; known suffixes dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"list file {path} does not exist; pass --list with the dataset's list file")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(_strip_suffix(line))
    if not names:
        raise InputError(f"list file {path} names no slice or case; check the file")
    duplicates = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if duplicates:
        raise InputError(f"list file {path} names {duplicates[0]} more than once; remove the duplicates")
    return names


def write_list(names: list[str], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write names one per line, atomically (the draw, as H-SAM writes its train.txt)."""
    from ..io.atomic import atomic_write

    text = "".join(f"{n}\n" for n in names).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(text), overwrite=overwrite)


def sample_fraction(names: list[str], fraction: float, seed: int) -> list[str]:
    """``int(len(names) * fraction)`` names drawn as H-SAM draws them: ``random.sample`` after ``random.seed(seed)``.

    The result is in draw order, exactly ``random.seed(seed); random.sample(names, k)``.
    A fraction of 1 keeps every name in list order (no draw).
    """
    if not 0 < fraction <= 1:
        raise InputError(f"--fraction must be in (0, 1], not {fraction}")
    if fraction == 1:
        return list(names)
    k = int(len(names) * fraction)
    if k < 1:
        raise InputError(f"--fraction {fraction} of {len(names)} slices is less than one slice; raise it")
    return random.Random(seed).sample(list(names), k)


def patients_in_order(names: list[str], patient_of) -> list[str]:
    """Distinct patients in order of first appearance in the list."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(patient_of(n), None)
    return list(seen)


def sample_patients(names: list[str], patient_of, k: int, *, order: str = "list", seed: int = 0) -> list[str]:
    """Every slice of K patients, in list order.

    ``order="list"``: the first K patients of the list (SSL4MIS: its ACDC
    ``train_slices.list`` is sorted, and "3 labeled patients" = its first 68
    slices). ``order="random"``: ``random.seed(seed); random.sample(patients, k)``.
    """
    patients = patients_in_order(names, patient_of)
    if not 1 <= k <= len(patients):
        raise InputError(f"--patients {k} is impossible: the list has {len(patients)} patient(s)")
    if order == "list":
        chosen = set(patients[:k])
    elif order == "random":
        chosen = set(random.Random(seed).sample(patients, k))
    else:
        raise InputError(f"--patient-order must be list or random, not {order!r}")
    return [n for n in names if patient_of(n) in chosen]


def _strip_suffix(name: str) -> str:
    for suffix in (".npy.h5", ".nii.gz", ".npz", ".h5", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
