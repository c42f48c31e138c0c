"""The baseline a user would otherwise pick: a 2-D U-Net trained from scratch on the same slices.

MONAI's BasicUNet (``pip install monai``, the ``bench`` extra), wrapped so that the few-shot
training loop (train/fewshot.train: same augmentation, loss and schedule) and ``segment_image``
run it exactly as they run HF-SAM. Used by ``hfsam bench fewshot`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import InputError


def require_monai() -> None:
    """Refuse before any training when MONAI is missing (not after the other rows have run)."""
    import importlib.util

    if importlib.util.find_spec("monai") is None:
        raise InputError(
            "the U-Net baseline needs MONAI: pip install monai (or pip install -e '.[bench]'), "
            "or leave it out with --methods hfsam decoder_only"
        )


@dataclass(frozen=True)
class UNetSpec:
    img_size: int
    num_classes: int


class UNetBaseline(nn.Module):
    def __init__(self, img_size: int, num_classes: int):
        super().__init__()
        require_monai()
        from monai.networks.nets import BasicUNet

        self.spec = UNetSpec(img_size, num_classes)
        self.net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=num_classes + 1)

    def forward(self, images):
        """[B,1|3,S,S] in [0,1] -> class logits [B, K+1, S, S] (the input's first channel only)."""
        return self.net(images[:, :1] * 2 - 1)

    def trainable_state_dict(self):
        return {n: p.detach() for n, p in self.named_parameters()}
