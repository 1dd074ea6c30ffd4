"""MAE: a ViT encoder and a lightweight decoder on timm's Block and PatchEmbed (docs/methods.md 0).

The methods follow facebookresearch/mae models_mae.py step by step: patchify, random_masking,
forward_encoder, forward_decoder and forward_loss. mimpipe adds three things:
- masks may come from outside (the mask server) with equal or per-image counts (docs/methods.md 1.4 (b));
- attention maps come from any block through pure functions (`block_qkv`, `attention_logits`,
  `attention_probs`), so the blocks keep timm's fused SDPA path and maps cost nothing unless asked
  for: raw logits for GPA (3.2), softmax probabilities for IDM and AttMask (5.2);
- `forward_features_until` stops after the deepest block a teacher needs.
Encoder parameters use timm's ViT names, so timm `vit_*` weights and MAE release weights both load.
Mask convention everywhere: mask [N, L], 1/True = masked (MAE: 1 is remove), 0 = kept.
"""
from dataclasses import dataclass, replace
from functools import partial
from typing import Mapping

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mimpipe.train.checkpoint import load_checkpoint
from mimpipe.train.losses import mae_loss, patch_loss
from mimpipe.train.pos_embed import get_2d_sincos_pos_embed


@dataclass(frozen=True)
class ModelConfig:
    """One MAE variant. The decoder_* fields are unused by an encoder-only model (teacher)."""
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3
    norm_pix_loss: bool = True  # every MAE recipe passes --norm_pix_loss (docs/methods.md 0.6)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:  # 2-D sin-cos splits D in four
            raise ValueError(f"embed dims must be multiples of 4: {self.embed_dim}, {self.decoder_embed_dim}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


# Variants: timm-style names; sizes from docs/methods.md 0.1, LUT's ViT-S, and two tiny ones for tests.
def mae_vit_base_patch16(**overrides) -> ModelConfig:
    """MAE ViT-B/16: 768 wide, 12 deep, 12 heads; decoder 512 wide, 8 deep, 16 heads."""
    return replace(ModelConfig(224, 16, 768, 12, 12, 512, 8, 16), **overrides)


def mae_vit_large_patch16(**overrides) -> ModelConfig:
    """MAE ViT-L/16: 1024 wide, 24 deep, 16 heads; decoder 512 x 8, 16 heads."""
    return replace(ModelConfig(224, 16, 1024, 24, 16, 512, 8, 16), **overrides)


def mae_vit_huge_patch14(**overrides) -> ModelConfig:
    """MAE ViT-H/14: 1280 wide, 32 deep, 16 heads; decoder 512 x 8, 16 heads."""
    return replace(ModelConfig(224, 14, 1280, 32, 16, 512, 8, 16), **overrides)


def mae_vit_small_patch16(**overrides) -> ModelConfig:
    """LUT's ViT-S/16 (models_lut.py): 384 wide, 12 deep, 6 heads; MAE decoder 512 x 8, 16 heads."""
    return replace(ModelConfig(224, 16, 384, 12, 6, 512, 8, 16), **overrides)


def mae_vit_tiny_patch8_64(**overrides) -> ModelConfig:
    """Demo size, 64 px, L = 64: 192 wide, 4 deep, 3 heads (d_h 64); decoder 128 x 2, 4 heads."""
    return replace(ModelConfig(64, 8, 192, 4, 3, 128, 2, 4), **overrides)


def mae_vit_micro_patch8_64(**overrides) -> ModelConfig:
    """Unit-test size, 64 px, L = 64: 64 wide, 2 deep, 2 heads (d_h 32); decoder 32 x 1, 2 heads."""
    return replace(ModelConfig(64, 8, 64, 2, 2, 32, 1, 2), **overrides)


MODELS = {f.__name__: f for f in (mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14,
                                  mae_vit_small_patch16, mae_vit_tiny_patch8_64, mae_vit_micro_patch8_64)}


def model_config(name: str, img_size: int | None = None, **overrides) -> ModelConfig:
    """The ModelConfig of a registered variant, with field overrides (e.g. norm_pix_loss=False).

    img_size (--img-size; None = the variant's own) is MAE's --input_size: the patch embed and the
    fixed sin-cos pos embeds are built for the new grid, nothing is interpolated.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    cfg = MODELS[name](**overrides)
    if img_size is None:
        return cfg
    if not isinstance(img_size, int) or img_size <= 0 or img_size % cfg.patch_size:
        raise ValueError(f"--img-size {img_size!r}: must be a positive multiple of {name}'s patch size "
                         f"{cfg.patch_size}")
    return replace(cfg, img_size=img_size)


def create_model(name: str, img_size: int | None = None, *, encoder_only: bool = False,
                 **overrides) -> "MaskedAutoencoderViT":
    """The variant `name` built at img_size (see model_config)."""
    return MaskedAutoencoderViT(model_config(name, img_size, **overrides), encoder_only=encoder_only)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, L, p*p*C]; patches row-major, each as (row, col, channel), channel fastest."""
    N, C, H, W = imgs.shape
    assert H == W and H % p == 0
    h = w = H // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """x [N, L, p*p*C] -> imgs [N, C, H, W]; the exact inverse of patchify."""
    N, L, PPC = x.shape
    h = w = int(L ** 0.5)
    assert h * w == L and PPC % (p * p) == 0
    C = PPC // (p * p)
    x = x.reshape(N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, C, h * p, w * p)


def random_masking(x: torch.Tensor, mask_ratio: float, *, generator: torch.Generator):
    """MAE per-sample random masking: keep len_keep = int(L * (1 - mask_ratio)) tokens per image.

    x: [N, L, D] -> (x_masked [N, len_keep, D], mask [N, L] float 1 = masked, ids_restore [N, L]).
    Noise is U[0, 1) drawn from `generator`, never from the global RNG.
    """
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, generator=generator, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    return masking_from_shuffle(x, ids_shuffle, len_keep)


def masking_from_shuffle(x: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int):
    """The second half of MAE's random_masking: keep x at ids_shuffle[:, :len_keep].

    x: [N, L, D], ids_shuffle: [N, L] permutation -> (x_masked [N, len_keep, D],
    mask [N, L] float32 1 = masked, ids_restore [N, L] the inverse permutation). Any score gives an
    ids_shuffle = argsort(score) (docs/methods.md 0.4), so score-based masks share MAE's code path.
    """
    N, L, D = x.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))
    # float32 even under autocast: mask.sum() is the loss denominator
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle to patch order
    return x_masked, mask, ids_restore


def given_mask(mask: torch.Tensor, N: int, L: int, len_keep: int | None = None):
    """Validate an external mask [N, L] of 0/1 values (any dtype, 1 = masked).

    Returns (mask bool [N, L] on its own device, max and min kept count per row). len_keep: the
    count every row keeps, where the caller knows it without reading the mask (random masks, AMR
    batch mode, a server batch's equal len_keep). Reading a GPU mask's values is a host sync, so a
    GPU mask with len_keep is taken on trust (server masks are checked on arrival by
    maskserver/protocol.py, strategies build exact counts); a CPU mask is always checked, against
    len_keep too, which costs the GPU nothing.
    """
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"mask shape {tuple(mask.shape)} != (N, L) = {(N, L)}")
    if len_keep is not None and not (isinstance(len_keep, int) and 1 <= len_keep <= L):
        raise ValueError(f"len_keep {len_keep!r}: must be one int in [1, L = {L}], the count of every row")
    if len_keep is not None and mask.device.type != "cpu":
        return mask.bool(), len_keep, len_keep
    kept = (mask == 0).sum(dim=1)
    # host sync: K is a shape (paid only by a GPU mask without len_keep; one read for every check)
    bad, k_max, k_min = torch.stack([((mask != 0) & (mask != 1)).any().long(), kept.max(),
                                     kept.min()]).tolist()
    if bad:
        raise ValueError("mask values must be 0/1 or bool (1/True = masked)")
    if k_min == 0:
        rows = (kept == 0).nonzero().flatten().tolist()
        raise ValueError(f"mask rows {rows} mask every patch; each image must keep at least one")
    if len_keep is not None and not k_min == k_max == len_keep:
        raise ValueError(f"len_keep {len_keep} given, but mask rows keep {k_min} to {k_max} patches")
    return mask.bool(), k_max, k_min


def key_padding_mask(len_keep: torch.Tensor, slots: int) -> torch.Tensor:
    """len_keep: [N] kept count per image -> bool [N, 1, 1, 1 + slots], True = may be attended.

    Bool is SDPA's convention and timm's manual path turns it into -inf on padded keys. The cls key is
    always valid, so no query row is all -inf (no NaN from padded queries).
    """
    valid = torch.arange(slots, device=len_keep.device).unsqueeze(0) < len_keep.unsqueeze(1)
    valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
    return valid[:, None, None, :]


def block_qkv(block: Block, x: torch.Tensor):
    """x: tokens entering `block`, [N, T, C] -> (q, k, v), each [N, H, T, d_h].

    Recomputes what block.attn computes from block.norm1(x), q_norm/k_norm included, so the block
    itself keeps the fused SDPA path; the extra qkv matmul is paid only where a map is asked for.
    """
    attn = block.attn
    N, T, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(N, T, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k: [N, H, T, d_h] -> raw scaled logits q k^T / sqrt(d_h), [N, H, T_q, T_k] (GPA uses these)."""
    return (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k: [N, H, T, d_h] -> softmax over keys of the logits, [N, H, T_q, T_k]; rows sum to 1."""
    return attention_logits(q, k).softmax(dim=-1)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a timm-named ViT encoder and, unless encoder_only, MAE's lightweight decoder."""

    def __init__(self, cfg: ModelConfig, *, encoder_only: bool = False):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.norm_pix_loss = cfg.norm_pix_loss
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        L = cfg.num_patches

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # fixed sin-cos, frozen (MAE); a loaded timm pos_embed stays frozen too
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, cfg.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([block(cfg.embed_dim, cfg.num_heads) for _ in range(cfg.depth)])
        self.norm = norm_layer(cfg.embed_dim)

        self.encoder_only = encoder_only
        if not encoder_only:
            Dd = cfg.decoder_embed_dim
            self.decoder_embed = nn.Linear(cfg.embed_dim, Dd, bias=True)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, Dd), requires_grad=False)
            self.decoder_blocks = nn.ModuleList([block(Dd, cfg.decoder_num_heads)
                                                 for _ in range(cfg.decoder_depth)])
            self.decoder_norm = norm_layer(Dd)
            self.decoder_pred = nn.Linear(Dd, cfg.patch_size ** 2 * cfg.in_chans, bias=True)  # to pixels
        self.initialize_weights()

    def initialize_weights(self):
        """MAE init (docs/methods.md 0.1): sin-cos pos embeds, xavier Linears, N(0, .02) tokens, LN (1, 0)."""
        grid = int(self.cfg.num_patches ** 0.5)
        for pe in [self.pos_embed] + ([] if self.encoder_only else [self.decoder_pos_embed]):
            table = get_2d_sincos_pos_embed(pe.shape[-1], grid, cls_token=True)  # float64
            pe.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like nn.Linear, not a conv (MAE)
        # timm's trunc_normal_(std=.02) is effectively normal_(std=.02) as the cutoff is too big (MAE)
        torch.nn.init.normal_(self.cls_token, std=0.02)
        if not self.encoder_only:
            torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def forward_encoder(self, imgs, mask_ratio=0.75, *, mask=None, len_keep=None, generator=None,
                        pad_to=None):
        """imgs [N, C, H, W] -> (latent [N, 1 + K, D], mask [N, L] float 1 = masked, ids_restore [N, L]).

        mask None: MAE random masking at mask_ratio, noise from `generator` (required).
        mask given ([N, L] bool/0-1, 1 = masked): ids_shuffle is its stable argsort, so kept tokens enter
        in ascending patch order. If images keep different counts K_b (AMR sample mode, docs/methods.md
        1.4 (b)), K = max K_b (or pad_to) slots and every block masks the padded keys; latent slots
        past K_b are padding, which forward_decoder (given mask) replaces by mask_token. A fixed pad_to
        keeps shapes static across batches (torch.compile, CUDA graphs).
        len_keep (int): every image keeps this many (see given_mask); then K is known without reading
        the mask, and a CUDA step has no host sync. A CPU mask is checked on the CPU and copied
        without blocking (a pinned one must not be overwritten before the step runs).
        """
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]  # add pos embed w/o cls token
        N, L, _ = x.shape
        attn_mask = None
        if mask is None:
            if generator is None or len_keep is not None:
                raise ValueError("random masking needs generator=torch.Generator and no len_keep (or pass mask=)")
            x, mask, ids_restore = random_masking(x, mask_ratio, generator=generator)
        else:
            mask, k_max, k_min = given_mask(mask, N, L, len_keep)
            mask = mask.to(x.device, non_blocking=True)  # a blocking copy would wait for the GPU
            slots = k_max if pad_to is None else pad_to
            if not k_max <= slots <= L:
                raise ValueError(f"pad_to {pad_to} must lie in [max kept count {k_max}, L {L}]")
            ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # kept first
            x, _, ids_restore = masking_from_shuffle(x, ids_shuffle, slots)
            if pad_to is not None or k_min < slots:
                attn_mask = key_padding_mask((~mask).sum(dim=1), slots)
            mask = mask.float()
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(N, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:  # Block(x, attn_mask) is recent timm; only the padded path needs it
            x = blk(x) if attn_mask is None else blk(x, attn_mask=attn_mask)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore, mask=None, return_hidden=False):
        """x: latent [N, 1 + K, D], ids_restore [N, L] -> pred [N, L, p*p*C] (cls dropped).

        mask ([N, L], 1 = masked) matters only for a padded latent: masked positions then get
        mask_token whatever the encoder left in their slot. With equal counts it changes nothing.
        return_hidden: also return hidden = [X^0, X^1, ..., X^depth], each [N, 1 + L, Dd] (cls
        first): X^0 the tokens entering decoder_blocks[0] (after decoder_pos_embed, what MTO's
        L_spa/L_e and GPA's MAM head read, docs/methods.md 4.1, 3.5), X^l the output of block l before
        decoder_norm. Returns (pred, hidden) then.
        """
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        if mask is not None:  # padded slots must never reach the decoder
            x_ = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(x_.dtype), x_)
        x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
        x = x + self.decoder_pos_embed
        hidden = [x]
        for blk in self.decoder_blocks:
            x = blk(x)
            hidden.append(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        return (x, hidden) if return_hidden else x

    def forward_loss(self, imgs, pred, mask):
        """imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L] 1 = masked -> scalar loss.

        Per-patch MSE against (optionally per-patch normalized) pixels, then ONE mean over all masked
        patches of the batch, not a mean of per-image means (MAE).
        """
        return mae_loss(patch_loss(pred, patchify(imgs, self.patch_size), self.norm_pix_loss), mask)

    def forward(self, imgs, *, mask=None, len_keep=None, mask_ratio=0.75, generator=None, pad_to=None):
        """imgs [N, C, H, W] -> (loss, pred [N, L, p*p*C], mask [N, L] float 1 = masked).

        Keyword-only so MAE's positional `model(imgs, 0.75)` fails loudly instead of being a mask.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, mask=mask, len_keep=len_keep,
                                                         generator=generator, pad_to=pad_to)
        pred = self.forward_decoder(latent, ids_restore, mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features_until(self, imgs, depth: int):
        """imgs [N, C, H, W] -> tokens [N, 1 + L, D] entering block `depth` on the full image.

        No masking, patch order kept; depth 0 = embedded tokens, depth len(blocks) = last block's
        output before `norm`. A teacher stops here and reads maps with block_qkv(blocks[depth], x).
        """
        if not 0 <= depth <= len(self.blocks):
            raise ValueError(f"depth {depth} outside [0, {len(self.blocks)}]")
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks[:depth]:
            x = blk(x)
        return x


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        torch.nn.init.xavier_uniform_(m.weight)  # following official JAX ViT (MAE)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


# Classifier heads (timm, MAE fine-tune) and the MAE decoder are not part of the encoder.
IGNORED_PREFIXES = ("head.", "fc_norm.", "decoder_", "mask_token")


@dataclass(frozen=True)
class LoadReport:
    loaded: tuple
    ignored: tuple


def read_checkpoint(path: str, part: str = "model") -> Mapping[str, torch.Tensor]:
    """A weights file's state dict: `part` ('model' = student, 'ema' = teacher) of a mimpipe or MAE
    checkpoint, else the file itself (a timm state dict). weights_only: tensors and plain
    containers only, so a file can never run code here."""
    sd = load_checkpoint(path)
    return sd[part] if isinstance(sd.get(part), Mapping) else sd


def load_encoder_weights(encoder: MaskedAutoencoderViT, state_dict: Mapping) -> LoadReport:
    """load_encoder_state with only the encoder's own names: a training checkpoint also holds the
    decoder and loss heads (projector, predictor, mam); a missing encoder key is still an error."""
    own = encoder.state_dict()
    return load_encoder_state(encoder, {k: v for k, v in state_dict.items() if k in own})


def load_encoder_state(model: MaskedAutoencoderViT, state_dict: Mapping) -> LoadReport:
    """Load encoder weights (timm ViT names) from a timm `vit_*` state dict or an MAE checkpoint.

    An MAE release checkpoint is {'model': state_dict}. Head and decoder keys are ignored; any other
    missing, unexpected or mis-shaped key raises ValueError naming them all. pos_embed is copied as
    given (a timm model's learned one too), never interpolated.
    """
    sd = state_dict["model"] if isinstance(state_dict.get("model"), Mapping) else state_dict
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(IGNORED_PREFIXES)}
    ignored = sorted(k for k in sd if k.startswith(IGNORED_PREFIXES))
    missing = sorted(own.keys() - sd.keys())
    unexpected = sorted(sd.keys() - own.keys() - set(ignored))
    mismatched = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(own.keys() & sd.keys()) if sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"encoder state does not fit: missing {missing}; unexpected {unexpected}; "
                         f"shape mismatch {mismatched}")
    model.load_state_dict({k: sd[k] for k in own}, strict=False)
    return LoadReport(loaded=tuple(sorted(own)), ignored=tuple(ignored))
