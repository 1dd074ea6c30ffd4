"""mimpipe export: timm's ViT built from the exported file gives our encoder's features."""
from __future__ import annotations

import pytest
import timm
import torch

from mimpipe.tools.export import export, timm_spec
from mimpipe.train.evaluate import load_encoder
from mimpipe.train.trainer import TrainConfig, train

MICRO = "mae_vit_micro_patch8_64"


def test_timm_names_match_the_dims():
    assert timm_spec("mae_vit_base_patch16") == ("vit_base_patch16_224", {})
    assert timm_spec("mae_vit_large_patch16", 448) == ("vit_large_patch16_224", {"img_size": 448})
    name, kw = timm_spec(MICRO)
    assert name == "vit_tiny_patch16_224" and kw == dict(patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                                         mlp_ratio=4.0, img_size=64)
    for ours in ("mae_vit_small_patch16",):   # the twin has our dims (ViT-B: the same code, 4x the time)
        t = timm.create_model(timm_spec(ours)[0], pretrained=False, num_classes=0)
        e = load_encoder(ours, None)
        assert {k: v.shape for k, v in t.state_dict().items()} == {k: v.shape for k, v in e.state_dict().items()}


def test_exported_file_loads_in_timm_with_equal_features(sample_ds, tmp_path):
    train(TrainConfig(shards=str(sample_ds), out=str(tmp_path / "run"), model=MICRO, batch_size=8, max_steps=2,
                      threads=1, blr=1e-2))
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    r = export(ckpt, tmp_path / "enc.safetensors")   # the model comes from the checkpoint's config
    ours = load_encoder(None, ckpt).eval()
    vit = timm.create_model(r["timm_name"], pretrained=True, num_classes=0, **r["timm_kwargs"],
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "enc.safetensors"))).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.norm(ours.forward_features_until(x, ours.cfg.depth))
        got = vit.forward_features(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    with pytest.raises(RuntimeError, match="head.weight"):   # no head in the file: say num_classes
        timm.create_model(r["timm_name"], pretrained=True, **r["timm_kwargs"],
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "enc.safetensors")))
    with pytest.raises(ValueError, match="safetensors"):
        export(ckpt, tmp_path / "enc.pt")
