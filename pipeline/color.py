"""LUT's ColorAug (docs/methods.md 2.1) on a batch, with per-image parameters from the plan.

Vectorized over the batch (a per-image torchvision call costs ~1 s per batch of 64 on a CPU).
Semantics follow torchvision's tensor functions: brightness scales; contrast and saturation blend
with the grayscale mean / grayscale image; hue rotates in HSV; then exactly one of grayscale,
solarize (x >= 0.5 -> 1 - x, PIL's threshold 128) or a Gaussian blur of per-image sigma.

On a GPU nothing here reads the device: the parameters arrive as the plan's CPU numbers (the
blur's kernel size is decided from them on the CPU) and are copied from pinned memory without
blocking; constants are made once per device.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

GRAY = (0.2989, 0.587, 0.114)   # torchvision rgb_to_grayscale
OP_BLUR = 2                     # plan.color_params column 5: 0 grayscale, 1 solarize, 2 blur


@functools.cache
def device_constant(values: tuple[float, ...], device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, C, 1, 1] on `device`, made once: torch.tensor(list, device="cuda") is a
    blocking host-to-device copy, which per batch would stall the producer on the GPU's queue."""
    # host sync: once per (values, device, dtype); the copy completes before this returns, so
    # the constant is ready for every stream that uses it later
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]"""
    return (x * device_constant(GRAY, x.device, x.dtype)).sum(1, keepdim=True)


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


def blur_radius(params: np.ndarray) -> int:
    """The blur kernel's half-width for a batch of plan.color_params rows, decided on the CPU:
    max(1, ceil(3 * the batch's largest sigma)), or 0 when no image of the batch is blurred."""
    if not (params[:, 5] == OP_BLUR).any():
        return 0
    return max(1, math.ceil(3 * float(params[:, 6].max())))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable blur, one sigma per image, reflect padding, kernel 2*radius+1."""
    B, C, H, W = x.shape
    r = radius
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)          # [B*C, 2r+1]
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def color_augment(x: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """x: [B, 3, H, W] in [0, 1], on any device; params: [B, 7] float32 numpy from
    plan.color_params (jitter on, brightness, contrast, saturation, hue, op, sigma), on the CPU
    -> [B, 3, H, W] in [0, 1]."""
    radius = blur_radius(params)
    p = torch.from_numpy(params)
    if x.is_cuda:
        p = p.pin_memory()   # so that the copy below is queued on the current stream, not waited for
    p = p.to(x.device, x.dtype, non_blocking=True)
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
    blurred = gaussian_blur(x, p[:, 6], radius) if radius else x
    return torch.where(op == 0, gray, torch.where(op == 1, solar, blurred))
