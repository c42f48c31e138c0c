"""What a run is asked to do, as typed values: the model to use and how to run it.

The command line fills these from its flags (``cli/run_args.py``), the Slicer module's engine
process through the command line, and a Python user directly. ``chosen`` names the fields the
caller chose rather than left at their default: an adapter fixes its architecture and what its
model sees (``ADAPTER_FIXES``), so a chosen value that contradicts the adapter is refused while
a default simply gives way to the adapter's. The command line says which options were typed
(``typed``); for a Python caller, a value other than the default counts as chosen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError
from ..model.slice_smoothing import MAX_SLICE_SMOOTHING_MM

#: Options an adapter fixes: field -> (the option as typed on the command line, adapter metadata
#: field). Its architecture (its tensors fit only that model) and everything that changes what the
#: model sees: slice axis, intensity preset, input size.
ADAPTER_FIXES = {
    "backbone": ("--backbone", "backbone"),
    "img_size": ("--img-size", "img_size"),
    "rank": ("--rank", "rank"),
    "fusion": ("--fusion", "fusion"),
    "axis": ("--axis", "axis"),
    "preset": ("--preset", "intensity_preset"),
}


class _Choices:
    """``chosen``: the fields given as ``typed`` (the command line's typed options), or, where a
    Python caller gave none, every field whose value differs from its default."""

    typed: frozenset[str] | None

    @property
    def chosen(self) -> frozenset[str]:
        if self.typed is not None:
            return self.typed
        fields = dataclasses.fields(self)  # type: ignore[arg-type]  # every subclass is a dataclass
        return frozenset(f.name for f in fields if f.name != "typed" and getattr(self, f.name) != f.default)


@dataclass(frozen=True)
class ModelOptions(_Choices):
    """Which model: an adapter (library name or file) on a base checkpoint, or a new one."""

    adapter: str | None = None
    checkpoint: str | None = None  # default: the library's for the backbone; "none": random init
    backbone: str = "auto"
    img_size: int | None = None  # default: the backbone's
    rank: int = 5
    fusion: str = "two_step"
    library: str | None = None  # default: $HFSAM_HOME or ~/.hfsam
    typed: frozenset[str] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RunOptions(_Choices):
    """How to run it: where, in which precision, and what the model sees."""

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 4
    axis: str = "axial"
    preset: str = "auto"
    overwrite: bool = False
    typed: frozenset[str] | None = field(default=None, compare=False)


def fixed_by_adapter(
    model: ModelOptions, run: RunOptions, meta: Mapping[str, Any], adapter_name: str
) -> tuple[ModelOptions, RunOptions]:
    """The options with every value the adapter fixes taken from it; a chosen value that
    contradicts the adapter is refused, naming the option."""
    wrong: list[str] = []
    trained: list[str] = []
    model_kw: dict[str, Any] = {}
    run_kw: dict[str, Any] = {}
    for name, (option, key) in ADAPTER_FIXES.items():
        options, kw = (model, model_kw) if hasattr(model, name) else (run, run_kw)
        value = getattr(options, name)
        trained.append(f"{option[2:]} {meta[key]}")
        if name in options.chosen and value not in (meta[key], "auto"):
            wrong.append(f"{option} {value}")
        kw[name] = meta[key]
    if wrong:
        raise InputError(
            f"adapter {adapter_name} was trained for {', '.join(trained)}, not {', '.join(wrong)}: drop the "
            "option (an adapter fixes the model and what it sees) or choose an adapter trained for it"
        )
    # What was chosen is settled before the adapter's values come in: they are not the caller's choice.
    return (
        dataclasses.replace(model, typed=model.chosen, **model_kw),
        dataclasses.replace(run, typed=run.chosen, **run_kw),
    )


def _number(v: Any) -> bool:
    """A finite int or float; not a bool (True would pass as 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


#: option -> (rule, what the rule asks for): every command's and workflow's numbers; absent ones are skipped.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (_at_least(1), "a whole number of at least 1"),
    "minutes": (_positive, "a number of minutes above 0"),
    "lr": (_positive, "a positive learning rate (e.g. 0.0025)"),
    "batch_size": (_at_least(1), "a whole number of at least 1"),
    "holdout": (_at_least(0), "0 or more"),
    "cached_steps": (_at_least(0), "0 or more"),
    "jobs": (_at_least(1), "a whole number of at least 1"),
    "labeled_slices": (_at_least(1), "a whole number of at least 1"),
    "rank": (lambda v: _at_least(0)(v) and v <= 256, "a whole number from 0 to 256"),
    "img_size": (
        lambda v: _at_least(64)(v) and v <= 2048 and v % 16 == 0,
        "a multiple of 16 from 64 to 2048 (512 or 224 in practice)",
    ),
    "epochs": (_at_least(1), "a whole number of at least 1"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "0 or more"),
    "fraction": (lambda v: _positive(v) and v <= 1, "a share above 0 and at most 1 (0.1 = 10 %)"),
    "low_level_dropout": (
        lambda v: _number(v) and 0 <= v < 1,
        "a probability from 0 (off) up to, not including, 1 (--fusion none leaves the branch out)",
    ),
    "slice_smoothing": (
        lambda v: _number(v) and 0 <= v <= MAX_SLICE_SMOOTHING_MM,
        f"a width in mm from 0 (off) to {MAX_SLICE_SMOOTHING_MM:g}",
    ),
}


def check_ranges(*options: Any) -> None:
    """Refuse a number outside its range (``RANGES``), naming the option as it is typed: ``--lr nan``,
    ``--minutes 0`` or ``--steps -1`` would otherwise be noticed after the model has loaded, or never.
    ``options``: parsed arguments or the workflows' option objects."""
    for holder in options:
        for name in RANGES:
            check_range(name, getattr(holder, name, None))


def check_range(name: str, value: Any, *, required: bool = False) -> None:
    """One option's number against ``RANGES`` (None: not given, refused where ``required``)."""
    ok, wanted = RANGES[name]
    if (value is not None or required) and not ok(value):
        raise InputError(f"--{name.replace('_', '-')} must be {wanted}, not {value!r}")
