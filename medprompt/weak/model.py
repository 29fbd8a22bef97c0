"""The weakly supervised 2D network, its input grid, and its checkpoint-ensemble prediction.

Every image is shown to the network the same way in training and inference: three channels (an RGB
image's own, so an MR composite keeps its sequences apart; a grey image repeated), each clipped to its
0.5-99.5 percentiles and scaled to [0, 1], the longest side resized to ``size`` and the short side
padded symmetrically (aspect kept). The prediction is the mean of the softmax of K snapshots saved
along training (checkpoint ensembling, as MedCLIP-SAMv2 does); its normalised entropy is the
uncertainty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medprompt.io.image2d import Image2D
from medprompt.model.checkpoint import read_model_file

FORMAT = "medprompt-weak2d/1"
CHANNELS = (16, 32, 64, 128)  # MONAI UNet widths: about 0.2 M weights, a few hundred steps on a CPU


def build_net(n_classes: int, dropout: float = 0.1) -> torch.nn.Module:
    """A small residual MONAI UNet: 3 channels in, background + ``n_classes`` logits out, at full resolution.

    Strided convolutions (not BasicUNet's full-resolution double convolutions) keep a training step
    on a 2-core CPU to a fraction of a second at 256 pixels.
    """
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=n_classes + 1, channels=CHANNELS,
                strides=(2,) * (len(CHANNELS) - 1), num_res_units=1, dropout=dropout)


@dataclass(frozen=True)
class Grid:
    """Where an image of ``shape`` lies on the square network grid: scale, then padding."""

    shape: tuple[int, int]
    size: int

    @property
    def inner(self) -> tuple[int, int]:
        h, w = self.shape
        scale = self.size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    @property
    def offset(self) -> tuple[int, int]:
        ih, iw = self.inner
        return (self.size - ih) // 2, (self.size - iw) // 2

    def to_net(self, array: np.ndarray, nearest: bool = False) -> np.ndarray:
        """(C, H, W) on the image grid -> (C, size, size), zeros in the padding."""
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        t = F.interpolate(t, size=self.inner, mode="nearest" if nearest else "bilinear",
                          align_corners=None if nearest else False)
        (top, left), (ih, iw) = self.offset, self.inner
        out = np.zeros((array.shape[0], self.size, self.size), np.float32)
        out[:, top:top + ih, left:left + iw] = t[0].numpy()
        return out

    def to_image(self, net: torch.Tensor) -> torch.Tensor:
        """(N, C, size, size) -> (N, C, H, W): the padding cut off, resized back bilinearly."""
        (top, left), (ih, iw) = self.offset, self.inner
        return F.interpolate(net[:, :, top:top + ih, left:left + iw], size=self.shape, mode="bilinear",
                             align_corners=False)


def channels(image: Image2D) -> np.ndarray:
    """(3, H, W) in [0, 1]: each channel clipped to its 0.5-99.5 percentiles (grey repeated three times)."""
    pixels = image.pixels if image.is_rgb else np.repeat(image.pixels[:, :, None], 3, axis=2)
    out = np.empty((3,) + image.shape, np.float32)
    for c in range(3):
        lo, hi = np.percentile(pixels[:, :, c], (0.5, 99.5))
        out[c] = np.clip((pixels[:, :, c] - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    return out


def net_input(image: Image2D, size: int) -> tuple[np.ndarray, Grid]:
    grid = Grid(image.shape, size)
    return grid.to_net(channels(image)), grid


class WeakModel:
    """A trained weak-supervision model: K snapshots of one network, the classes and the grid size."""

    def __init__(self, snapshots: list[dict], classes: list[str], size: int, meta: dict | None = None,
                 device: str | torch.device = "cpu") -> None:
        if not snapshots:
            raise ValueError("a weak model needs at least one snapshot")
        self.classes, self.size, self.meta = list(classes), int(size), dict(meta or {})
        self.device = torch.device(device)
        self.nets = []
        for state in snapshots:
            net = build_net(len(self.classes)).to(self.device)
            net.load_state_dict(state)
            net.eval()
            self.nets.append(net)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "WeakModel":
        """Read a model file written by :func:`medprompt.weak.train.train_weak`; WeightsError naming it otherwise."""
        path = Path(path)
        blob = read_model_file(path, FORMAT, "weak-supervision model",
                               make=f"medprompt train-weak --images DIR --prompts CLASS --out {path}")
        return cls(blob["snapshots"], blob["classes"], blob["size"], blob.get("meta"), device)

    @torch.no_grad()
    def probabilities(self, image: Image2D) -> tuple[np.ndarray, np.ndarray]:
        """Mean softmax of the snapshots (C+1, H, W) on the image's pixels, and its normalised entropy (H, W)."""
        x, grid = net_input(image, self.size)
        probs = ensemble_probabilities(self.nets, torch.from_numpy(x)[None].to(self.device))
        probs = grid.to_image(probs)[0].clamp_min(0)
        probs = probs / probs.sum(0, keepdim=True).clamp_min(1e-6)
        return probs.cpu().numpy(), normalised_entropy(probs[None])[0].cpu().numpy()


def ensemble_probabilities(nets: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """(N, C+1, h, w) mean of the nets' softmax on a batch already on the network grid."""
    total = None
    for net in nets:
        p = torch.softmax(net(x).float(), dim=1)
        total = p if total is None else total + p
    return total / len(nets)


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) probabilities -> (N, h, w) entropy over classes / log C, in [0, 1]."""
    c = probs.shape[1]
    h = -(probs * probs.clamp_min(1e-8).log()).sum(1)
    return h / float(np.log(max(c, 2)))
