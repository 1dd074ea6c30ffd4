"""LUT's ColorAug (docs/methods.md 2.1) on a batch, with per-image parameters from the plan.

Vectorized over the batch (a per-image torchvision call costs ~1 s per batch of 64 on a CPU).
Semantics follow torchvision's tensor functions: brightness scales; contrast and saturation blend
with the grayscale mean / grayscale image; hue rotates in HSV; then exactly one of grayscale,
solarize (x >= 0.5 -> 1 - x, PIL's threshold 128) or a Gaussian blur of per-image sigma.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY = (0.2989, 0.587, 0.114)   # torchvision rgb_to_grayscale


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]"""
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eq = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eq, torch.ones_like(maxc), maxc)
    d = torch.where(eq, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h, s, v):
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable blur, one sigma per image, reflect padding, kernel 2*ceil(3*max sigma)+1."""
    B, C, H, W = x.shape
    r = max(1, math.ceil(3 * float(sigma.max())))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)          # [B*C, 2r+1]
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def color_augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """x: [B, 3, H, W] in [0, 1]; params: [B, 7] from plan.color_params
    (jitter on, brightness, contrast, saturation, hue, op, sigma) -> [B, 3, H, W] in [0, 1]."""
    p = params.to(x.dtype)
    col = lambda j: p[:, j].view(-1, 1, 1, 1)  # noqa: E731
    x = (x * col(1)).clamp(0, 1)
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = (col(2) * x + (1 - col(2)) * mean).clamp(0, 1)
    x = (col(3) * x + (1 - col(3)) * grayscale(x)).clamp(0, 1)
    h, s, v = _rgb_to_hsv(x)
    x = _hsv_to_rgb(torch.fmod(h + p[:, 4].view(-1, 1, 1) + 1.0, 1.0), s, v)
    op = p[:, 5].long().view(-1, 1, 1, 1)
    gray = grayscale(x).expand_as(x)
    solar = torch.where(x >= 0.5, 1.0 - x, x)
    blurred = gaussian_blur(x, p[:, 6]) if bool((op == 2).any()) else x
    return torch.where(op == 0, gray, torch.where(op == 1, solar, blurred))
