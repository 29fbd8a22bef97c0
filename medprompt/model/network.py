"""MedPromptNet: ViT patch features, a projection into the frozen text space, a text-conditioned decoder.

2.5D by design: three adjacent axial slices of the RAS working grid enter as channels. A 2D ViT
keeps the token count (and CPU cost) small, can start from 2D CLIP vision towers such as
BiomedCLIP's ViT-B/16, and neighbouring slices give it the through-plane context it needs
(measured in BENCHMARKS.md). One network serves every class: the class is a text vector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from medprompt.errors import InputError


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters; stored in every checkpoint so it rebuilds itself."""

    text_dim: int = 384  # the frozen text encoder's output (MiniLM: 384, BiomedCLIP: 512)
    in_slices: int = 3
    tile: int = 192  # input tile in pixels of the working grid (2.5 mm: 48 cm)
    patch: int = 8
    width: int = 192
    depth: int = 6
    heads: int = 6
    joint_dim: int = 128  # shared patch-text space of the contrastive loss
    pixel_dim: int = 32  # decoder's per-pixel feature width

    @classmethod
    def preset(cls, name: str, text_dim: int) -> "NetConfig":
        presets = {
            "small": dict(),  # default: trains on a CPU in minutes to hours
            "tiny": dict(tile=64, patch=8, width=32, depth=1, heads=2, joint_dim=16, pixel_dim=8),  # tests
            "vit_b16": dict(tile=224, patch=16, width=768, depth=12, heads=12, joint_dim=256, pixel_dim=64),
        }
        if name not in presets:
            raise InputError(f"unknown model config '{name}'; available: {', '.join(presets)}")
        return cls(text_dim=text_dim, **presets[name])

    def to_dict(self) -> dict:
        return asdict(self)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.GELU())


class MedPromptNet(nn.Module):
    """Image -> patch embeddings (for the region-text loss) and one mask logit map per prompt."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(
            img_size=cfg.tile, patch_size=cfg.patch, in_chans=cfg.in_slices, embed_dim=cfg.width,
            depth=cfg.depth, num_heads=cfg.heads, num_classes=0, global_pool="", dynamic_img_size=True,
        )
        # Region-text alignment: patches and (projected) frozen text vectors meet in one space.
        self.patch_proj = nn.Linear(cfg.width, cfg.joint_dim)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.joint_dim), nn.GELU(), nn.Linear(cfg.joint_dim, cfg.joint_dim))
        self.background = nn.Parameter(torch.randn(cfg.joint_dim) * 0.02)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # exp -> 1/0.07, learned as in CLIP
        # Decoder: token map upsampled to half resolution with skips from a light conv stem; the
        # prompt-conditioned head runs there and its logits are upsampled (4x cheaper than full
        # resolution, which dominated CPU time, at 5 mm logit spacing smoothed bilinearly).
        n_up = max(1, cfg.patch.bit_length() - 2)  # patch 8 -> 2 doublings (to 1/2), 16 -> 3
        stem_dims = [max(cfg.pixel_dim // 2, 8)] * n_up
        self.stem = nn.ModuleList()
        cin = cfg.in_slices
        for d in stem_dims:
            self.stem.append(_conv(cin, d))
            cin = d
        self.token_in = nn.Conv2d(cfg.width, cfg.pixel_dim * 2, 1)
        self.up = nn.ModuleList()
        c = cfg.pixel_dim * 2
        for i in range(n_up):
            out = cfg.pixel_dim if i == n_up - 1 else max(cfg.pixel_dim, c // 2)
            self.up.append(_conv(c + stem_dims[n_up - 1 - i], out))
            c = out
        # Prompt conditioning: FiLM of the per-pixel features by the class's text vector.
        self.film = nn.Linear(cfg.joint_dim, 2 * cfg.pixel_dim)
        # ... plus a direct pixel-text similarity (as in LSeg): a linear path that tells classes
        # apart from the first step, where FiLM alone starts out nearly class-blind.
        self.pixel_proj = nn.Conv2d(cfg.pixel_dim, cfg.joint_dim, 1)
        self.pixel_scale = nn.Parameter(torch.tensor(2.3))  # exp -> 10
        self.head = nn.Sequential(nn.Conv2d(cfg.pixel_dim, cfg.pixel_dim, 1), nn.GELU(), nn.Conv2d(cfg.pixel_dim, 1, 1))

    def text_embed(self, text: torch.Tensor) -> torch.Tensor:
        """Frozen text vectors (P, text_dim) -> normalised joint-space vectors (P, joint_dim)."""
        return F.normalize(self.text_proj(text), dim=-1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, in_slices, H, W), H and W multiples of the patch; text: (P, text_dim).

        Returns mask logits (B, P, H, W) and normalised patch embeddings (B, joint_dim, H/p, W/p).
        """
        b, _, h, w = x.shape
        p = self.cfg.patch
        tokens = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens :]
        grid = tokens.transpose(1, 2).reshape(b, self.cfg.width, h // p, w // p)
        patch_emb = F.normalize(self.patch_proj(tokens), dim=-1).transpose(1, 2).reshape(b, -1, h // p, w // p)

        skips = []
        s = x
        for conv in self.stem:
            s = conv(F.avg_pool2d(s, 2))
            skips.append(s)
        f = self.token_in(grid)
        for i, conv in enumerate(self.up):
            skip = skips[len(skips) - 1 - i]
            f = F.interpolate(f, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            f = conv(torch.cat([f, skip], dim=1))
        t = self.text_embed(text)
        gamma, beta = self.film(t).chunk(2, dim=-1)  # (P, pixel_dim) each
        cond = f[:, None] * (1 + gamma[None, :, :, None, None]) + beta[None, :, :, None, None]  # (B,P,C,H,W)
        logits = self.head(cond.flatten(0, 1)).view(b, t.shape[0], *f.shape[-2:])
        pix = F.normalize(self.pixel_proj(f), dim=1)
        logits = logits + self.pixel_scale.exp() * torch.einsum("bdhw,pd->bphw", pix, t)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits, patch_emb

    def region_logits(self, patch_emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Patch-vs-class similarities (B, 1+P, h, w): background first, then each text vector."""
        classes = torch.cat([F.normalize(self.background, dim=0)[None], self.text_embed(text)], dim=0)
        return self.logit_scale.exp().clamp(max=100) * torch.einsum("bdhw,kd->bkhw", patch_emb, classes)


def init_from_open_clip(net: MedPromptNet, visual: nn.Module) -> int:
    """Copy a CLIP vision tower's ViT weights (e.g. BiomedCLIP's timm ViT-B/16) into the encoder.

    Only tensors whose names and shapes match are copied; the 3-slice patch embedding takes the
    RGB filters as they are (three slices in place of three colours). Returns how many were copied.
    """
    trunk = getattr(visual, "trunk", visual)
    src = trunk.state_dict()
    dst = net.encoder.state_dict()
    copied = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    if "pos_embed" in src and "pos_embed" in dst and src["pos_embed"].shape != dst["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        n = net.cfg.tile // net.cfg.patch
        copied["pos_embed"] = resample_abs_pos_embed(src["pos_embed"], (n, n), num_prefix_tokens=1)
    net.encoder.load_state_dict(copied, strict=False)
    return len(copied)
