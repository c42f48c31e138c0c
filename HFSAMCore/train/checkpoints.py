"""Training checkpoints: safetensors with a JSON header (epoch, step, optimizer), nothing pickled."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import InputError
from .dataset_config import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CONFIG_FILE,
)

# AdamW's settings that say how it computes, not what: taken from this build's optimizer on resume.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
_CKPT_NAME = re.compile(r"^epoch_(\d{4,})\.safetensors$")


def checkpoint_path(output: Path, epoch: int) -> Path:
    return output / CHECKPOINT_DIR / f"epoch_{epoch:04d}.safetensors"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    folder = output / CHECKPOINT_DIR
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT_NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(
    path: Path, model, optimizer, *, epoch: int, step: int, digest: str, base: dict, scaler=None
) -> Path:
    """Trainable tensors + AdamW state as safetensors, position, hyper-parameters and the fp16
    GradScaler's state (``scaler``, if any) as JSON; atomic."""
    from safetensors.torch import save

    from ..io.atomic import atomic_write

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    tensors = {f"model.{n}": t.detach().cpu().contiguous().clone() for n, t in model.trainable_state_dict().items()}
    state = optimizer.state_dict()
    extra_state: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if hasattr(value, "detach"):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                extra_state.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "step": step,
        "config_digest": digest,
        "base_checkpoint": base,
        "parameters": names,
        "param_groups": groups,
        "extra_state": extra_state,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }
    data = save(tensors, metadata={"hfsam_checkpoint": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda fh: fh.write(data), overwrite=True)


class DamagedCheckpoint(InputError):
    """A checkpoint file that cannot be read (resume then falls back to the one before)."""


def load_checkpoint(path: Path, model, optimizer, *, digest: str, base: dict, scaler=None) -> dict:
    """Restore model, optimizer (and the fp16 ``scaler``) from ``path``; returns its position {"epoch", "step"}.

    Raises DamagedCheckpoint for an unreadable file, InputError for a checkpoint
    of another run (other configuration, base or model).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads((fh.metadata() or {})["hfsam_checkpoint"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as exc:  # noqa: BLE001 - any failure means: not a usable checkpoint
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedCheckpoint(f"{path} is not a readable training checkpoint ({detail})") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise DamagedCheckpoint(f"{path} is not an hfsam train checkpoint of version {CHECKPOINT_VERSION}")
    if meta.get("config_digest") != digest:
        raise InputError(
            f"{path} belongs to another configuration than {CONFIG_FILE}; do not mix run folders (start a new --output)"
        )
    if (meta.get("base_checkpoint") or {}).get("sha256") != base.get("sha256"):
        raise InputError(
            f"{path} was trained on base {meta.get('base_checkpoint')}, not on {base}; "
            "pass the same --checkpoint file as the first run"
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if meta["parameters"] != names:
        raise InputError(f"{path} holds other trainable tensors than this model; it is from another build")
    model.load_trainable_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("extra_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for i, g in enumerate(meta["param_groups"]):
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        # How this build runs AdamW (make_optimizer), not how the saving build did: a checkpoint from
        # before the fused kernel would otherwise switch it off for the rest of the run.
        mine = optimizer.param_groups[i] if i < len(optimizer.param_groups) else {}
        g.update({k: mine[k] for k in IMPLEMENTATION_FLAGS if k in mine})
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})  # moves the moments to the params' device
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    return {"epoch": int(meta["epoch"]), "step": int(meta["step"])}
