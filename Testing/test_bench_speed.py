"""`bench speed`'s fine-tuning rows: the full step and the few-shot recipe's cached step, in the report."""

import torch

from HFSAMCore.bench.common import machine_info
from HFSAMCore.bench.report import to_markdown
from HFSAMCore.bench.speed import _finetune_worker

TINY = {"backbone": "tiny", "img_size": 64, "num_classes": 3, "rank": 2, "fusion": "two_step"}


def test_cached_and_full_fine_tuning_steps_are_both_measured_and_reported(monkeypatch):
    from HFSAMCore.model.hfsam import HFSAM

    encodes = []
    encoder_features = HFSAM.encoder_features

    def counted(self, images):  # the real encoder, counted: a cached step must not run it
        encodes.append(len(images))
        return encoder_features(self, images)

    monkeypatch.setattr(HFSAM, "encoder_features", counted)
    rows = []
    for cached in (False, True):
        encodes.clear()
        r = _finetune_worker(TINY, "cpu", "float32", 2, 2, cached)
        assert r["batch"] == 2 and r["seconds_per_step"] > 0 and r["peak_memory_mb"] > 0
        assert encodes == ([2] if cached else [2, 2, 2])  # once before the steps; or 1 warm-up + 2 timed steps
        rows.append(
            {
                "step": "cached" if cached else "full",
                "precision": "float32",
                "img_size": 64,
                "batch": 2,
                "s_per_step": r["seconds_per_step"],
                "ms_per_slice": 1,
                "steps_per_s": 1,
                "peak_memory_mb": 1,
            }
        )
    result = {
        "machine": machine_info(torch.device("cpu")),
        "spec": TINY,
        "ceiling_gflops": {"float32": 1.0},
        "gflop_per_slice": 1.0,
        "gflop_executed_per_slice": 1.0,
        "inference": [],
        "finetune": rows,
    }
    text = to_markdown("speed", result, "hfsam bench speed")
    table = text.split("## Fine-tuning step")[1]
    assert "| full | float32 |" in table and "| cached | float32 |" in table
