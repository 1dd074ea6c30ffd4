"""MLP heads on pooled encoder features: LUT's projector h and predictor g (docs/methods.md 2.4).

[C naver-ai/lut models/models_lut.py `_build_mlp`, itself MoCo v3's without the last BN]. LUT calls
the projector `head`; mimpipe calls it `projector` so it is never mistaken for timm's classifier
`head.*`, which encoder loading ignores.
"""
from __future__ import annotations

import torch.nn as nn


def mlp_head(in_dim: int, *, hidden: int = 4096, out_dim: int, depth: int = 2,
             bn: bool = True) -> nn.Sequential:
    """[N, in_dim] -> [N, out_dim]: `depth` bias-free Linears, BN1d + ReLU between them, none after
    the last. depth 2 (LUT): Linear(in, hidden) -> BN1d(hidden) -> ReLU -> Linear(hidden, out).

    bn=False drops the BN1d (LUT's argparse default `head_norm_layer=None`; its recipe and paper use
    BN, hence the default here). Linears stay bias-free either way, as in LUT.
    """
    if depth < 1:
        raise ValueError(f"mlp_head depth must be >= 1, got {depth}")
    layers: list[nn.Module] = []
    for i in range(depth):
        last = i == depth - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=False))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
