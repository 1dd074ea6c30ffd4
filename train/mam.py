"""MAM attention decoder: predicts the teacher's GPA value of every patch (docs/methods.md 3.5).

[C Lrbomchz/MM2024_GPA model_GPA_learn_atten.py, itself HPM's loss predictor]: a second stack of
decoder Blocks that reads the SAME input tokens as the RGB decoder (decoder_embed(latent), mask
tokens inserted and unshuffled, + decoder_pos_embed, so those three stay shared and owned by the
MAE model), with its own norm and a Linear(Dd, p*p*C) whose channel mean is the prediction.
The loss is `train.losses.mam_loss`.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from mimpipe.train.model import ModelConfig, _init_weights


class MAMHead(nn.Module):
    """tokens [N, 1 + L, Dd] entering the RGB decoder's first block -> GPA prediction [N, L]."""

    def __init__(self, cfg: ModelConfig, depth: int | None = None):
        super().__init__()
        Dd = cfg.decoder_embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        self.blocks = nn.ModuleList([block(Dd, cfg.decoder_num_heads)
                                     for _ in range(cfg.decoder_depth if depth is None else depth)])
        self.norm = norm_layer(Dd)
        # p*p*C outputs averaged, not Linear(Dd, 1): the official parametrization (same function
        # class, but its init scale and gradient differ), kept for reproduction
        self.pred = nn.Linear(Dd, cfg.patch_size ** 2 * cfg.in_chans, bias=True)
        self.apply(_init_weights)

    def copy_decoder_blocks(self, decoder_blocks: nn.ModuleList) -> None:
        """Start from the RGB decoder's blocks, as the official code does (first `depth` of them)."""
        if len(decoder_blocks) < len(self.blocks):
            raise ValueError(f"MAM depth {len(self.blocks)} > RGB decoder depth {len(decoder_blocks)}")
        for mine, theirs in zip(self.blocks, decoder_blocks):
            mine.load_state_dict(theirs.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:].mean(dim=-1)  # drop cls, one scalar per patch
