"""MAE's optimizer recipe (docs/methods.md 0.6) as pure functions: parameter groups, lr and EMA schedules."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


@dataclass(frozen=True)
class Schedule:
    lr: float              # peak lr = blr * effective batch / 256
    epochs: float
    warmup_epochs: float
    min_lr: float = 0.0


def lr_at(epoch: float, s: Schedule) -> float:
    """Linear warmup from 0, then half-cycle cosine to min_lr; epoch is fractional (MAE sets it
    every iteration from epoch + step / steps_per_epoch)."""
    if epoch < s.warmup_epochs:
        return s.lr * epoch / s.warmup_epochs
    t = (epoch - s.warmup_epochs) / max(s.epochs - s.warmup_epochs, 1e-12)
    return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def ema_momentum(done: float, total: float, m0: float = 0.996) -> float:
    """LUT's cosine momentum, m0 -> 1 over training (docs/methods.md 2.6); done / total is the
    progress, in iterations or (the trainer's) fractional epochs."""
    return 1.0 + 0.5 * (m0 - 1.0) * (1.0 + math.cos(math.pi * done / max(total, 1)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's param_groups_weight_decay as MAE used it: no decay for 1-D tensors and biases
    (norms, biases); cls_token and mask_token (3-D) are decayed; frozen pos embeds are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, m: float) -> None:
    """ξ <- m ξ + (1 - m) θ over the whole state dict, floating buffers (BN stats) included;
    `ema` holds a subset of `model`'s names (the encoder without the decoder).

    One foreach lerp, ξ + (1 - m)(θ - ξ), over every floating tensor: torch's public EMA kernel
    (swa_utils.get_ema_multi_avg_fn), a few launches per step instead of two per tensor."""
    src = model.state_dict()
    ema_floats, model_floats = [], []
    for k, v in ema.state_dict().items():
        if v.dtype.is_floating_point:
            ema_floats.append(v)
            model_floats.append(src[k])
        else:
            v.copy_(src[k])  # integer buffers (BN's num_batches_tracked) are copied
    if ema_floats:
        get_ema_multi_avg_fn(m)(ema_floats, model_floats, None)
