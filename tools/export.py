"""`mimpipe export CKPT OUT.safetensors`: the encoder of a checkpoint as a timm ViT state dict.

Our encoder already uses timm's VisionTransformer names (patch_embed.proj, cls_token, pos_embed,
blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm), so the export keeps the encoder's
tensors as they are and leaves out the decoder, mask token and loss heads. The file loads with

    timm.create_model(NAME, pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file=OUT, mean=IMAGENET_MEAN, std=IMAGENET_STD), **KWARGS)

timm reads a `.safetensors` `file` with safetensors (timm/models/_helpers.py load_state_dict),
runs the ViT's checkpoint_filter_fn (which resamples pos_embed only if the grid differs) and loads
strictly unless num_classes differs from the pretrained cfg's 1000: then the head is dropped and
left fresh. The file holds no head, so pass num_classes=0 (features) or the classes to fine-tune;
the default 1000 fails with "Missing key(s): head.weight". mean/std: MAE trains on ImageNet
normalization, while vit_base_patch16_224's default pretrained cfg says 0.5 (augreg).
ViT-S/B/L/H map to timm names of the same dims; the 64-px test models have none, so they are
built from vit_tiny_patch16_224 with explicit kwargs (img_size, patch_size, embed_dim, depth,
num_heads), which timm's factories pass on over their own defaults.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mimpipe.train.model import ModelConfig, model_config

# our variant -> the timm ViT of the same width, depth, heads and patch (at 224 px)
TIMM_NAMES = {"mae_vit_small_patch16": "vit_small_patch16_224", "mae_vit_base_patch16": "vit_base_patch16_224",
              "mae_vit_large_patch16": "vit_large_patch16_224", "mae_vit_huge_patch14": "vit_huge_patch14_224"}
TEMPLATE = "vit_tiny_patch16_224"   # the base for variants without a timm twin (explicit kwargs)


def timm_spec(model: str, img_size: int | None = None) -> tuple[str, dict]:
    """-> (timm model name, kwargs for timm.create_model) of the ViT that our `model` encoder equals."""
    cfg: ModelConfig = model_config(model, img_size)
    name = TIMM_NAMES.get(model)
    kwargs = {} if name else dict(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                                  num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
    if name is None or cfg.img_size != 224:
        kwargs["img_size"] = cfg.img_size
    return name or TEMPLATE, kwargs


def timm_state_dict(encoder_state: dict) -> dict[str, torch.Tensor]:
    """Our encoder's state dict -> timm's names (the same ones), contiguous, for safetensors."""
    return {k: v.detach().contiguous().clone() for k, v in encoder_state.items()}


def export(checkpoint: str, out: str | Path, *, part: str = "model", model: str | None = None) -> dict:
    """Write the encoder of `checkpoint` to `out` (.safetensors); -> what a user passes to timm."""
    from safetensors.torch import save_file
    from mimpipe.train.evaluate import encoder_from_checkpoint
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the export is a .safetensors file (timm picks its loader by the suffix)")
    enc, ours = encoder_from_checkpoint(checkpoint, part, model)
    name, kwargs = timm_spec(ours, enc.cfg.img_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mimpipe_model": ours, "timm_name": name, "timm_kwargs": json.dumps(kwargs),
            "source": str(checkpoint), "part": part}
    save_file(timm_state_dict(enc.state_dict()), str(out), metadata=meta)
    return {"file": str(out), "timm_name": name, "timm_kwargs": kwargs, "model": ours}


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a `mimpipe train` checkpoint (or an MAE / timm file with --model)")
    p.add_argument("out", help="OUT.safetensors")
    p.add_argument("--part", default="model", choices=["model", "ema"], help="student or EMA teacher")
    p.add_argument("--model", default=None, help="our variant name; default: the checkpoint's config")


def main(args) -> int:
    r = export(args.checkpoint, args.out, part=args.part, model=args.model)
    extra = "".join(f", {k}={v!r}" for k, v in r["timm_kwargs"].items())
    print(f"{r['file']}: encoder of {r['model']} as timm {r['timm_name']}{extra}; load with\n"
          f"  from timm.data import IMAGENET_DEFAULT_MEAN as M, IMAGENET_DEFAULT_STD as S\n"
          f"  timm.create_model({r['timm_name']!r}, pretrained=True, num_classes=0{extra},\n"
          f"      pretrained_cfg_overlay=dict(file={r['file']!r}, mean=M, std=S))")
    return 0
