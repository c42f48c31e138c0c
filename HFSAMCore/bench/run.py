"""`hfsam bench`: runs the speed or few-shot benchmark and writes its results (Markdown and JSON)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.progress import Progress
from .fewshot import run_fewshot
from .report import to_markdown
from .speed import run_speed


@dataclass(frozen=True)
class BenchOptions:
    which: str  # "speed" or "fewshot"
    output: str = "benchmarks/results"
    quick: bool = False  # fewer repeats; fewshot: N = 1 and 5 only
    n: Sequence[int] | None = None  # fewshot: numbers of labeled slices (default 1 3 5 10)
    methods: Sequence[str] | None = None  # fewshot: rows per N (default: registry.DEFAULT_FEWSHOT_METHODS)
    steps: int | None = None  # fewshot: default the backbone's recipe (U-Net 500)
    seeds: Sequence[int] | None = None  # fewshot: one row per seed, and their spread (default 0)
    jobs: int = 1  # fewshot: rows run at once
    volume: str | None = None  # speed: the volume of the whole-segment timing (default: the DICOM sample)
    backbone: str = "auto"
    img_size: int | None = None
    rank: int = 5
    fusion: str = "two_step"
    checkpoint: str | None = None
    library: str | None = None
    device: str = "auto"


def run_bench(options: BenchOptions, progress: Progress, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark; write OUTPUT/<which>_<backbone>_<device>.md and .json. Returns their paths."""
    from ..io.atomic import atomic_write_bytes
    from ..runtime.device import resolve_device

    result = run_speed(options, progress) if options.which == "speed" else run_fewshot(options, progress)
    command = command or "hfsam " + " ".join(sys.argv[1:])
    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(options.device)
    backbone = result.get("backbone") or result["spec"]["backbone"]
    tag = f"{options.which}_{backbone}_{device.type}"
    result["command"] = command
    files = {"markdown": to_markdown(options.which, result, command), "json": json.dumps(result, indent=2)}
    paths = {"markdown": out / f"{tag}.md", "json": out / f"{tag}.json"}
    for kind, text in files.items():  # a benchmark re-run replaces its own results
        atomic_write_bytes(paths[kind], text.encode(), overwrite=True)
    progress.log(f"wrote {paths['markdown']} and .json")
    return {kind: str(p) for kind, p in paths.items()}
