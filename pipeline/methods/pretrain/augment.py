"""Batched, device-side augmentations (airbench style): one tensor op per batch, no per-sample Python."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def random_affine(
    x: torch.Tensor,
    g: torch.Generator,
    max_translate: float = 0.125,
    max_degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Random per-sample rotation, scale and translation (fractions of the image size)."""
    n, dev = x.shape[0], x.device
    angle = _uniform(n, -max_degrees, max_degrees, g, dev) * math.pi / 180
    s = _uniform(n, scale[0], scale[1], g, dev)
    tx = _uniform(n, -2 * max_translate, 2 * max_translate, g, dev)
    ty = _uniform(n, -2 * max_translate, 2 * max_translate, g, dev)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def contrastive_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A SimCLR-style view for small images: strong affine, contrast/brightness jitter, noise.

    Colour jitter acts on normalised tensors as a per-sample scale and shift, which is what
    brightness and contrast jitter amount to after normalisation.
    """
    n, dev = x.shape[0], x.device
    v = random_affine(x, g, max_translate=0.2, max_degrees=20.0, scale=(0.75, 1.15))
    contrast = _uniform(n, 0.6, 1.4, g, dev).view(n, 1, 1, 1)
    brightness = _uniform(n, -0.4, 0.4, g, dev).view(n, 1, 1, 1)
    noise = torch.randn(v.shape, generator=g, device=dev) * 0.1
    return v * contrast + brightness + noise
