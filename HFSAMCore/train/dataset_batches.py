"""Dataset slices as torch batches: a DataLoader dataset, collation, and per-sample augmentation seeds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported inside the functions: `import HFSAMCore` stays cheap
    import torch


def torch_dataset_class():
    import torch

    class SliceDataset(torch.utils.data.Dataset):
        """(index, image [H,W] float32 in [0,1], label [H,W] int64) per named slice, read when asked."""

        def __init__(self, reader, names: list[str]):
            self.reader, self.names = reader, list(names)

        def __len__(self) -> int:
            return len(self.names)

        def __getitem__(self, i: int):
            image, label = self.reader.load_slice(self.names[i])
            return i, image, label

    return SliceDataset


def collate_slices(batch):
    """Keep the slices as a list: sizes may differ (ACDC), they are resized on the device."""
    return batch


def to_model_batch(batch, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B,1,S,S] (bilinear, as model/inference.to_model_input) and labels [B,S,S] (nearest) on the device."""
    import torch

    from ..model.inference import to_model_input
    from .training_set import resize_labels

    xs, ys = [], []
    for _, image, label in batch:
        xs.append(to_model_input(image[None], size, device))
        lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)).to(device)[None]
        ys.append(resize_labels(lab, (size, size)))
    return torch.cat(xs), torch.cat(ys)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch, the same on every process."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def augment_samples(kind: str, x, y, seeds: list[int], sizes: list[tuple[int, int]]):
    """The augmentation recipe ``kind`` applied to each sample with its own generator (see the module
    docstring); ``sizes``: each slice's (H, W) as stored, which H-SAM's sizes are relative to."""
    import torch

    from .augmentation import augment_sample

    out = [
        augment_sample(kind, x[i : i + 1], y[i : i + 1], torch.Generator().manual_seed(s), sizes[i])
        for i, s in enumerate(seeds)
    ]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
