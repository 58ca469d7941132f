"""Input mixers for fine-tuning: ``(x, y, num_classes, alpha, rng) -> (x_mixed, y_soft)``.

Every mixer pairs sample i with sample i-1 (the batch rolled by one, as torchvision's MixUp
and CutMix do) and returns soft targets whose weights are the share of each image actually
kept. Every random draw comes from ``rng``, a numpy Generator that the caller seeds (one per
model, from base.seed): no mixer reads a global RNG. The draws are scalars and small masks,
made on the host; the images are mixed on their own device.

MixUp and CutMix are written here rather than taken from torchvision.transforms.v2, because
torchvision's take no generator (they read torch's global RNG); they follow its formulas.

Manifold mixup mixes hidden activations, not inputs: it is a ``ManifoldMixup`` object that
hooks the model's ``mix_layers()`` (see attach) and mixes at the layer it drew for the batch.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from pipeline.registry import Registry

Mixer = Callable[[torch.Tensor, torch.Tensor, int, float, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]
MIXERS: Registry[Mixer] = Registry("mixer")




def _mix_with_mask(x: torch.Tensor, y: torch.Tensor, num_classes: int, keep: torch.Tensor):
    """x * keep + partner * (1 - keep); target weights = each sample's mean of ``keep``.
    ``keep`` is (N or 1, 1, H, W) with values in [0, 1]."""
    partner = x.roll(1, 0)
    keep = keep.to(x.dtype)
    mixed = x * keep + partner * (1 - keep)
    lam = keep.mean(dim=(1, 2, 3)).expand(x.shape[0])
    return mixed, soft_targets(y, y.roll(1, 0), lam, num_classes, x.dtype)


def soft_targets(y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor | float, num_classes: int,
                 dtype=torch.float32) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=dtype, device=y_a.device).reshape(-1, 1)
    return lam * F.one_hot(y_a, num_classes).to(dtype) + (1 - lam) * F.one_hot(y_b, num_classes).to(dtype)


@MIXERS.register("none")
def no_mixing(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain empirical risk minimisation: inputs unchanged, one-hot targets."""
    return x, F.one_hot(y, num_classes).to(x.dtype)


@MIXERS.register("mixup")
def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup: Zhang, Cisse, Dauphin & Lopez-Paz 2018, "mixup: Beyond Empirical Risk
    Minimization". Convex combination of a batch with its roll, lambda ~ Beta(alpha, alpha)
    (one lambda per batch, as torchvision's MixUp)."""
    lam = float(rng.beta(alpha, alpha))
    return lam * x + (1 - lam) * x.roll(1, 0), soft_targets(y, y.roll(1, 0), lam, num_classes, x.dtype)


@MIXERS.register("cutmix")
def cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix: Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers
    with Localizable Features". Pastes a box from the rolled batch; targets mix by the box's
    area after clipping to the image. As torchvision's CutMix: lambda ~ Beta(alpha, alpha), a
    centre uniform over the pixels, half-sides int(sqrt(1 - lambda) / 2 * side)."""
    _, _, h, w = x.shape
    lam = float(rng.beta(alpha, alpha))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    half = 0.5 * math.sqrt(1.0 - lam)
    rh, rw = int(half * h), int(half * w)
    y0, y1, x0, x1 = max(cy - rh, 0), min(cy + rh, h), max(cx - rw, 0), min(cx + rw, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x.roll(1, 0)[:, :, y0:y1, x0:x1]
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, soft_targets(y, y.roll(1, 0), kept, num_classes, x.dtype)


@MIXERS.register("resizemix")
def resizemix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, rng: np.random.Generator,
              scale: tuple[float, float] = (0.1, 0.8)) -> tuple[torch.Tensor, torch.Tensor]:
    """ResizeMix: Qin et al. 2020, "ResizeMix: Mixing Data with Preserved Object Information and
    True Labels". The whole partner image, resized by tau ~ U(0.1, 0.8), is pasted at a random
    place; its label weight is the pasted area. (``alpha`` is unused: tau sets the ratio.)"""
    n, _, h, w = x.shape
    tau = float(rng.uniform(*scale))
    ph, pw = max(1, round(h * tau)), max(1, round(w * tau))
    top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = F.interpolate(x.roll(1, 0), size=(ph, pw), mode="bilinear", align_corners=False, antialias=True)
    mixed = x.clone()
    mixed[:, :, top : top + ph, left : left + pw] = patch
    lam = 1 - ph * pw / (h * w)
    return mixed, soft_targets(y, y.roll(1, 0), lam, num_classes, x.dtype)


def spectral_residual_saliency(x: torch.Tensor) -> torch.Tensor:
    """Spectral-residual saliency (Hou & Zhang 2007), the detector SaliencyMix uses, per image
    of (N, C, H, W) -> (N, H, W): log amplitude minus its 3x3 local mean, back to the image
    domain with the original phase, squared and smoothed."""
    grey = x.float().mean(1)
    spectrum = torch.fft.fft2(grey)
    log_amp = torch.log(spectrum.abs() + 1e-8)
    residual = log_amp - F.avg_pool2d(log_amp[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    sal = torch.fft.ifft2(torch.exp(residual + 1j * spectrum.angle())).abs() ** 2
    return F.avg_pool2d(sal[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]


def _box_masks(centers_y: torch.Tensor, centers_x: torch.Tensor, h: int, w: int, lam: float,
               device) -> torch.Tensor:
    """Per-sample boxes of area about (1 - lam) * H * W around the given centres, clipped to
    the image; returns keep masks (N, 1, H, W) with 0 inside the box."""
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    y0, y1 = (centers_y - cut_h // 2).clamp(0, h), (centers_y + cut_h - cut_h // 2).clamp(0, h)
    x0, x1 = (centers_x - cut_w // 2).clamp(0, w), (centers_x + cut_w - cut_w // 2).clamp(0, w)
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])
    return (~(in_rows[:, :, None] & in_cols[:, None, :]))[:, None].float()


@MIXERS.register("saliencymix")
def saliencymix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SaliencyMix: Uddin et al. 2021, "SaliencyMix: A Saliency Guided Data Augmentation Strategy
    for Better Regularization". CutMix's box (area from lambda ~ Beta(alpha, alpha)), centred on
    the peak of the partner image's spectral-residual saliency, pasted at the same place."""
    n, _, h, w = x.shape
    sal = spectral_residual_saliency(x.roll(1, 0)).flatten(1)
    peak = sal.argmax(1)
    keep = _box_masks(peak // w, peak % w, h, w, float(rng.beta(alpha, alpha)), x.device)
    return _mix_with_mask(x, y, num_classes, keep)


def fourier_mask(h: int, w: int, lam: float, rng: np.random.Generator, decay_power: float = 3.0) -> torch.Tensor:
    """FMix's binary mask: a random spectrum with amplitude ~ 1 / f^decay_power, back to the
    image domain, and its top round(lam * H * W) values set to 1."""
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.fftfreq(w).view(1, -1)
    freq = torch.sqrt(fx**2 + fy**2).clamp(min=1.0 / max(h, w))
    noise = torch.from_numpy(rng.standard_normal((2, h, w), dtype=np.float32))
    spectrum = torch.complex(noise[0], noise[1]) / freq**decay_power
    grey = torch.fft.ifft2(spectrum).real.flatten()
    keep = round(lam * h * w)
    mask = torch.zeros(h * w)
    if keep:
        mask[grey.topk(keep).indices] = 1.0
    return mask.view(1, 1, h, w)


@MIXERS.register("fmix")
def fmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
         rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FMix: Harris et al. 2020, "FMix: Enhancing Mixed Sample Data Augmentation". A binary mask
    from low-frequency Fourier noise (decay power 3) keeping a lambda ~ Beta(alpha, alpha) share."""
    _, _, h, w = x.shape
    return _mix_with_mask(x, y, num_classes, fourier_mask(h, w, float(rng.beta(alpha, alpha)), rng).to(x.device))


@MIXERS.register("gridmix")
def gridmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, rng: np.random.Generator,
            cells: tuple[int, int] = (2, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """GridMix: Baek, Bang & Shim 2021, "GridMix: Strong regularization through local context
    mapping". The image is cut into a g x g grid (g drawn from 2..4) and each cell, per sample,
    comes from the partner with probability 1 - lambda, lambda ~ Beta(alpha, alpha); targets
    mix by the share of cells kept. (The paper's auxiliary local-context loss is not included.)"""
    n, _, h, w = x.shape
    g = int(rng.integers(cells[0], cells[1] + 1))
    lam = float(rng.beta(alpha, alpha))
    grid = torch.from_numpy(rng.random((n, 1, g, g)) < lam).float().to(x.device)
    rows = torch.arange(h, device=x.device) * g // h
    cols = torch.arange(w, device=x.device) * g // w
    keep = grid[:, :, rows][:, :, :, cols]  # each pixel takes its cell's value
    return _mix_with_mask(x, y, num_classes, keep)


@MIXERS.register("smoothmix")
def smoothmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SmoothMix: Lee et al. 2020, "SmoothMix: a Simple Yet Effective Data Augmentation to Mitigate
    Overfitting in Deep Learning" (CVPR workshops). The partner shows through a Gaussian blob
    exp(-d^2 / 2 sigma^2) at a random centre (sigma ~ U(0.25, 0.5) of the side) with soft
    edges, instead of a hard box; targets mix by the blob's mean. (``alpha`` is unused.)"""
    _, _, h, w = x.shape
    cy, cx = float(rng.uniform(0, h)), float(rng.uniform(0, w))
    sigma = float(rng.uniform(0.25, 0.5)) * max(h, w)
    rows = torch.arange(h, device=x.device, dtype=torch.float32).view(-1, 1) + 0.5
    cols = torch.arange(w, device=x.device, dtype=torch.float32).view(1, -1) + 0.5
    blob = torch.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * sigma**2))
    return _mix_with_mask(x, y, num_classes, (1 - blob).view(1, 1, h, w))


class ManifoldMixup:
    """Manifold Mixup: Verma et al. 2019, "Manifold Mixup: Better Representations by Interpolating
    Hidden States". Per batch, a layer is drawn uniformly from {input} + model.mix_layers() and
    lambda ~ Beta(alpha, alpha); at that layer the activations become lam * h + (1 - lam) * h
    rolled by one, and targets mix with the same lambda.

    Calling it returns the unmixed inputs and the soft targets and arms the hooks that
    ``attach(model)`` installed; the next forward pass mixes once, at the drawn layer.
    """

    def __init__(self):
        self.pending: tuple[int, float] | None = None
        self.num_layers = 0

    def attach(self, model: nn.Module) -> list:
        layers = model.mix_layers()
        self.num_layers = len(layers)
        return [m.register_forward_hook(self._hook(i + 1)) for i, m in enumerate(layers)]

    def _hook(self, index: int):
        def mix_here(module, inputs, output):
            if self.pending is not None and self.pending[0] == index:
                lam = self.pending[1]
                self.pending = None
                return lam * output + (1 - lam) * output.roll(1, 0)
            return output

        return mix_here

    def __call__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, rng: np.random.Generator):
        if self.num_layers == 0:
            raise RuntimeError("manifold_mixup: call attach(model) before mixing")
        layer = int(rng.integers(0, self.num_layers + 1))
        lam = float(rng.beta(alpha, alpha))
        targets = soft_targets(y, y.roll(1, 0), lam, num_classes, x.dtype)
        if layer == 0:
            return lam * x + (1 - lam) * x.roll(1, 0), targets
        self.pending = (layer, lam)
        return x, targets


MIXERS.register("manifold_mixup")(ManifoldMixup)  # a class: each training run needs its own hooks


def build_mixer(name: str) -> Mixer:
    """The registered mixer, instantiated when it keeps per-model state (manifold mixup)."""
    entry = MIXERS[name]
    return entry() if isinstance(entry, type) else entry
