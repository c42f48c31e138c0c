"""A dataset training run's folder: checked and written before training, the final adapter after it.

``prepare_run_folder`` checks everything that would fail later (the base checkpoint, the classes,
the draw) before anything is written, then writes config.json and the list of drawn slices;
``save_final_adapter`` writes the run's model as a normal adapter with its metadata.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import InputError
from ..runtime.progress import Progress
from .dataset_config import (
    ADAPTER_FILE,
    AUTHORS_SYNAPSE_LIST_SHA256,
    CONFIG_FILE,
    SELECTED_FILE,
    DatasetTrainConfig,
    draw_slices,
    load_config,
    open_reader,
)


def prepare_run_folder(
    cfg: DatasetTrainConfig | None, output: Path, *, resume: bool, world: int, library, progress: Progress
) -> None:
    """Rank 0: check everything, draw the slices, then write config.json and the list (nothing writes first)."""
    from ..io.write import write_json
    from ..model.classes import resolve_classes
    from ..model.loading import resolve_checkpoint
    from ..store.library import ModelLibrary
    from .dataset_lists import write_list

    if resume:
        saved = load_config(output)
        if saved.world_size != world:
            raise InputError(
                f"this run was trained with {saved.world_size} process(es) (global batch "
                f"{saved.batch_size}); resume it with the same number "
                f"(torchrun --nproc_per_node {saved.world_size})"
            )
        if not (output / SELECTED_FILE).is_file():
            raise InputError(f"{output / SELECTED_FILE} is missing; the run folder is incomplete")
        return
    if cfg is None:
        raise InputError("give the dataset to train on (--dataset, --root), or --resume an existing run")
    if (output / CONFIG_FILE).exists():
        raise InputError(f"{output} already holds a training run; continue it with --resume or choose a new --output")
    if output.exists() and not output.is_dir():
        raise InputError(f"{output} is a file; --output must be a folder")
    # Fail before writing anything on what would fail later: the base checkpoint, the classes, the draw.
    if cfg.batch_size % world:
        raise InputError(
            f"the global batch {cfg.batch_size} does not split evenly over {world} processes; "
            f"pass a --batch-size that is a multiple of {world} (the authors': 16)"
        )
    resolve_checkpoint(cfg.checkpoint, cfg.backbone, library if library is not None else ModelLibrary())
    resolve_classes(cfg.classes)
    cfg = dataclasses.replace(cfg, world_size=world)
    reader = open_reader(cfg)
    selected = draw_slices(cfg, reader)
    missing = reader.missing_slices(selected)
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(selected)} training slices are not in {cfg.root} (first: "
            f"{missing[0]}); check --root and the list"
        )
    if cfg.train_list_sha256 == AUTHORS_SYNAPSE_LIST_SHA256:
        progress.log("--train-list is the authors' list (HF-SAM's lists_Synapse/train.txt = H-SAM's train_220.txt)")
    if len(selected) < cfg.batch_size:
        progress.warn(f"only {len(selected)} training slice(s) for a global batch of {cfg.batch_size}")
    output.mkdir(parents=True, exist_ok=True)
    write_list(selected, output / SELECTED_FILE, overwrite=True)
    write_json(cfg.as_dict(), output / CONFIG_FILE)
    progress.log(f"training on {len(selected)} slice(s) of {cfg.dataset} ({output / SELECTED_FILE})")


def save_final_adapter(
    cfg: DatasetTrainConfig,
    output: Path,
    model,
    lm,
    *,
    preset: str,
    step: int,
    final_loss: float,
    seconds: float,
    n_slices: int,
    world: int,
) -> Path:
    from ..store.adapters import save_adapter
    from ..store.training_record import TrainedAdapter, TrainingRecord

    regime = (
        "the --train-list"
        if cfg.train_list is not None
        else f"{cfg.fraction:g} of the slices"
        if cfg.fraction is not None
        else f"{cfg.patients} patients"
        if cfg.patients is not None
        else "all listed slices"
    )
    record = TrainingRecord(image=str(cfg.root), steps=step, seed=cfg.seed, batch_size=cfg.batch_size, lr=cfg.lr)
    description = cfg.description or (
        f"HF-SAM trained on {cfg.dataset} ({regime}, {n_slices} slices, {cfg.epochs} epochs, preset {cfg.preset})"
    )
    metadata = TrainedAdapter(
        name=cfg.name or output.name,
        spec=model.spec,
        base=lm.base,
        classes=lm.classes,
        preset=preset,
        axis=cfg.axis,
        training=record,
        metrics={"final_loss": final_loss, "seconds": seconds},
        description=description,
        extra={
            "dataset_training": {
                "dataset": cfg.dataset,
                "selected_list": SELECTED_FILE,
                "n_slices": n_slices,
                "world_size": world,
                "config": cfg.as_dict(),
            }
        },
        hfsam_version=cfg.hfsam_version,
    ).metadata()
    return save_adapter(output / ADAPTER_FILE, model.trainable_state_dict(), metadata, overwrite=True)
