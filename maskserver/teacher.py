"""The mask server's teacher ViT: weights from one of three sources, a truncated forward, LUT targets.

docs/methods.md "Decisions for mimpipe" and docs/design.md "Mask server". The teacher is the student's own
encoder (train/model.py, encoder_only) and computes only what the strategy reads
(strategies/__init__.py NEEDS), stopping the forward there:
    'none'      nothing (random)
    'embed'     patch_embed(img) + pos_embed[:, 1:], no block (sbam, amr)
    'qk'        the tokens entering block b, then q, k of block b; later blocks never run (gpa)
    'cls_attn'  as 'qk' at the last block, then only the cls query's softmax row: O(T) memory,
                never the T x T map (idm, attmask)
Sources (`source=`):
    online       only the parameters the strategy reads (`Teacher.state_for`), sent by the trainer
    momentum     the whole encoder plus LUT's projector and its BN buffers: the trainer's EMA snapshots
    frozen:PATH  a local MAE release ({'model': state_dict}) or timm state dict, loaded once
Parameter names are timm's ViT names (train/model.py), plus 'projector.*' for the momentum projector
(LUT calls it `head`; train/heads.py says why mimpipe does not).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping

import torch
from torch import Tensor

from mimpipe.maskserver.strategies import Masked, MaskInputs, Strategy, get_strategy
from mimpipe.train.heads import mlp_head
from mimpipe.train.model import (attention_probs, block_qkv, create_model, load_encoder_state, model_config,
                         read_checkpoint)

log = logging.getLogger(__name__)

# The network each paper picks masks with (docs/methods.md "Decisions"); another source is a logged deviation.
DEFAULT_SOURCE = {"sbam": "online", "amr": "online", "gpa": "frozen",
                  "idm": "momentum", "attmask": "momentum"}
PROJECTOR = "projector."


def default_source(strategy: str) -> str:
    """The paper's teacher where it needs no file. GPA's frozen pre-trained ViT cannot be assumed
    on disk, so gpa falls back to the momentum teacher (a deviation the teacher logs)."""
    source = DEFAULT_SOURCE.get(strategy, "momentum")
    return "momentum" if source == "frozen" else source


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """IEEE fp32 for cuDNN convolutions and CUDA matmuls inside (TF32 off), the previous flags after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def cls_attention(q: Tensor, k: Tensor) -> Tensor:
    """q, k: [N, H, T, dh], cls first -> [N, H, L] fp32: softmax(q_0 kᵀ / sqrt(dh)) over all T keys
    (the cls key included, as AttMask's `attn[:, :, 0, 1:]`), then the L patch columns, unrenormalized.
    Only the cls query's row is built, [N, H, 1, T]."""
    return attention_probs(q[:, :, :1].float(), k.float())[:, :, 0, 1:]


def block_for(strategy: Strategy, depth: int, block: int | None = None) -> int | None:
    """The encoder block `strategy` reads, in [0, depth): `block` (the run config's choice) overrides
    strategy.block; -1 = the last block. None for strategies that run no block."""
    if strategy.block is None:
        if block is not None:
            raise ValueError(f"strategy {strategy.name!r} reads no block (needs={strategy.needs!r}), "
                             f"got block={block}")
        return None
    if block is None and strategy.block >= depth:
        # the paper's block (gpa: 9 of ViT-B's 12) does not exist in a shallower model: its last
        # block is the nearest choice; pass block= to pick another
        block = depth - 1
    b = strategy.block if block is None else block
    b = depth + b if b < 0 else b
    if not 0 <= b < depth:
        raise ValueError(f"strategy {strategy.name!r} reads block {b}, but the model has blocks "
                         f"0..{depth - 1}; pass block=")
    return b


def strategy_options(strategy: str, cfg, options: Mapping | None = None) -> dict:
    """The strategy's options with defaults fitted to the model: gpa reads head 11 (the paper's)
    where the model has one, else the sum of its heads. Explicit options win."""
    options = dict(options or {})
    if strategy == "gpa" and "head" not in options and cfg.num_heads <= 11:
        options["head"] = -1
    return options


def state_prefixes(needs: str, block: int | None) -> tuple[str, ...]:
    """Name prefixes of the parameters and buffers that the computation for `needs` at `block` reads."""
    if needs == "none":
        return ()
    if needs == "embed":
        return ("patch_embed.", "pos_embed")
    # block b's input needs every earlier block whole; of block b itself only q and k are computed
    return ("patch_embed.", "cls_token", "pos_embed", *(f"blocks.{i}." for i in range(block)),
            *(f"blocks.{block}.{m}." for m in ("norm1", "attn.qkv", "attn.q_norm", "attn.k_norm")))


def _shape(value) -> tuple | str:
    """A tensor's shape, or the type name of anything else a peer may send."""
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


class Teacher:
    """The teacher ViT of the mask server. It never trains: eval mode, no grad, and its weights
    change only through `load_state` (online, momentum) or once at construction (frozen).

    version: the weights' version (-1 until the first load_state; 0 for frozen). step: the student
    step they come from (None until loaded, and always for frozen: it has no student step).
    held: the names load_state expects, timm encoder names plus 'projector.*'.
    """

    def __init__(self, model: str, source: str, *, strategy: str | None = None, block: int | None = None,
                 projector_hidden: int | None = 4096, device: str | torch.device = "cpu",
                 img_size: int | None = None):
        """model: a train/model.py variant name, built at img_size (default: the variant's), as the
        student is with --img-size. source: 'online' | 'momentum' | 'frozen:PATH'.
        strategy, block: what an `online` teacher holds (the others hold the whole encoder).
        projector_hidden: hidden width of the momentum projector (LUT: 4096); None = no projector."""
        self.source, self.kind, self.model = source, source.split(":", 1)[0], model
        self.device = torch.device(device)
        size = {} if img_size is None else {"img_size": img_size}
        self.cfg = model_config(model, **size)
        self.version, self.step = -1, None
        self.encoder = create_model(model, encoder_only=True, **size)
        self.projector = None
        self._prefixes: tuple[str, ...] = ("",)  # every name starts with ""
        self._noted: set[str] = set()
        if source == "online":
            if strategy is None:
                raise ValueError("source 'online' holds only what one strategy reads: pass strategy=")
            b = block_for(get_strategy(strategy), self.cfg.depth, block)
            self.encoder.blocks = self.encoder.blocks[:0 if b is None else b + 1]  # later blocks never run
            self._prefixes = Teacher.state_for(strategy, model, block)
        elif source == "momentum":
            if projector_hidden is not None:
                D = self.cfg.embed_dim
                self.projector = mlp_head(D, hidden=projector_hidden, out_dim=D)
        elif self.kind == "frozen":
            path = source.partition(":")[2]
            if not path:
                raise ValueError(f"teacher source {source!r}: frozen needs a file, frozen:PATH")
            state_dict = read_checkpoint(path)
            try:
                load_encoder_state(self.encoder, state_dict)
            except ValueError as e:  # name the file: the message lists the keys
                raise ValueError(f"{path}: {e}") from None
            self.version = 0
        else:
            raise ValueError(f"unknown teacher source {source!r}; choose from online, momentum, frozen:PATH")
        for m in (self.encoder, self.projector):
            if m is not None:
                m.to(self.device).eval().requires_grad_(False)
        self.held = tuple(k for k in self._state() if k.startswith(self._prefixes))

    @staticmethod
    def state_for(strategy: str, model: str, block: int | None = None) -> tuple[str, ...]:
        """Name prefixes of the weights an `online` teacher needs for `strategy` on `model`; the
        trainer sends `{k: v for k, v in sd.items() if k.startswith(prefixes)}`. sbam, amr:
        ('patch_embed.', 'pos_embed'); gpa at block b: the embedding, blocks 0..b-1 and block b's
        norm1 and qkv."""
        s = get_strategy(strategy)
        return state_prefixes(s.needs, block_for(s, model_config(model).depth, block))

    def _state(self) -> dict[str, Tensor]:
        """Every tensor the teacher has, by name; the values share storage with the modules."""
        sd = dict(self.encoder.state_dict())
        if self.projector is not None:
            sd.update({PROJECTOR + k: v for k, v in self.projector.state_dict().items()})
        return sd

    def held_spec(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """{name: (shape, is_float)} of the tensors load_state takes: what a peer's upload must match
        before the mask server buffers it (maskserver/weights.py WeightAssembler)."""
        own = self._state()
        return {k: (tuple(own[k].shape), own[k].is_floating_point()) for k in self.held}

    def reset(self) -> None:
        """Back to no weights (version -1: the server's random masks) for a new run or a restarted
        one: weights another run (or the killed launch) sent must not mask this one's batches. A
        frozen teacher keeps its checkpoint: it belongs to no run."""
        if self.kind != "frozen":
            self.version, self.step = -1, None

    @torch.no_grad()
    def load_state(self, state_dict: Mapping[str, Tensor], version: int, step: int) -> bool:
        """Swap in new weights between batches. state_dict must hold exactly the names in `held`, with
        their shapes (values are cast to the teacher's dtype and device). Returns False and changes
        nothing if version <= self.version (a duplicate or late upload); raises ValueError naming every
        missing, unexpected or mis-shaped key, also changing nothing."""
        if self.kind == "frozen":
            raise ValueError(f"teacher {self.source!r} is frozen; it takes no weights")
        if version <= self.version:
            return False
        own, held = self._state(), set(self.held)
        missing = sorted(held - state_dict.keys())
        unexpected = sorted(state_dict.keys() - held)
        mismatched = [f"{k} {_shape(state_dict[k])} vs teacher {_shape(own[k])}"
                      for k in sorted(held & state_dict.keys()) if _shape(state_dict[k]) != _shape(own[k])]
        if missing or unexpected or mismatched:
            raise ValueError(f"{self.source} teacher: weights v{version} (step {step}) do not fit: missing "
                             f"{missing}; unexpected {unexpected}; shape mismatch {mismatched}")
        for k in self.held:
            own[k].copy_(state_dict[k])
        self.version, self.step = version, step
        return True

    def compute(self, images: Tensor, strategy_name: str, *, ratio: float, generator: torch.Generator,
                progress: float = 0.0, head_probs: Tensor | None = None, block: int | None = None,
                options: Mapping | None = None) -> Masked:
        """images [N, 3, H, W] -> Masked(mask [N, L] bool True = masked, len_keep [N], extras); gpa's
        extras hold its MAM target 'gpa_target' [N, L]. generator lives on the teacher's device (all
        noise is drawn there); block overrides the strategy's block (gpa default 9); options go to
        the strategy (e.g. head=11)."""
        if generator.device.type != self.device.type:
            raise ValueError(f"generator on {generator.device}, teacher on {self.device}: noise is drawn "
                             f"where the teacher tensors are")
        strategy = get_strategy(strategy_name)
        # SBAM/AMR rank patches by unscaled x_i·x_j: TF32 (10 mantissa bits; torch's default for
        # cuDNN convolutions) would give other masks on a GPU than the fp32 ones tested on the CPU
        with full_fp32() if strategy.needs == "embed" else contextlib.nullcontext():
            inp = self.mask_inputs(images, strategy_name, block=block, progress=progress, head_probs=head_probs)
            return strategy(inp, ratio, generator=generator, **strategy_options(strategy_name, self.cfg, options))

    def scores(self, images: Tensor, strategy_name: str, *, block: int | None = None,
               options: Mapping | None = None) -> Tensor:
        """A cacheable strategy's per-patch score of `images` ([N, C, L] fp32: the part of its mask
        the teacher decides, maskserver/score_cache.py); options: as for compute (those of the
        stochastic step are not used here)."""
        strategy = get_strategy(strategy_name)
        if not strategy.cacheable:
            raise ValueError(f"strategy {strategy_name!r} has no cacheable score")
        inp = self.mask_inputs(images, strategy_name, block=block)
        score_options, _ = strategy.split_options(strategy_options(strategy_name, self.cfg, options))
        return strategy.score(inp, **score_options).float()

    @torch.no_grad()
    def mask_inputs(self, images: Tensor, strategy_name: str, *, block: int | None = None,
                    progress: float = 0.0, head_probs: Tensor | None = None) -> MaskInputs:
        """The truncated forward: images [N, 3, H, W] -> MaskInputs with only the field the strategy
        needs: embed [N, L, D] | q, k [N, H, 1 + L, dh] of its block | cls_attn [N, H, L]."""
        strategy = get_strategy(strategy_name)
        b = block_for(strategy, self.cfg.depth, block)
        N, L = images.shape[0], self.cfg.num_patches
        if strategy.needs == "none":
            return MaskInputs(N, L, progress=progress, head_probs=head_probs)
        self._check_loaded()
        self._check_holds(strategy, b)
        x = self._check_images(images)
        enc = self.encoder
        if strategy.needs == "embed":
            # fp32 even on CUDA: SBAM's unscaled x_i·x_j reach the hundreds, where bf16 (8 significant
            # bits) is off by about 1, a factor e after the softmax; one conv, AMP would save nothing
            fields = {"embed": enc.forward_features_until(x, 0)[:, 1:]}
        else:
            with self._autocast():
                # block_qkv also yields v: it falls out of the fused qkv Linear at no extra matmul
                q, k, _ = block_qkv(enc.blocks[b], enc.forward_features_until(x, b))
            fields = {"q": q, "k": k} if strategy.needs == "qk" else {"cls_attn": cls_attention(q, k)}
        return MaskInputs(N, L, progress=progress, head_probs=head_probs, **fields)

    @torch.no_grad()
    def lut_targets(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor]:
        """LUT's targets t_k = h_ξ(mean_{j>=1} norm(Enc_ξ(v_k))[:, j]) (docs/methods.md 2.3): both views
        whole (no masking), after the final LayerNorm, mean over the L patch tokens (cls excluded),
        then the projector with eval-mode BN (running statistics). view1, view2: [N, 3, H, W]
        -> t1, t2: [N, D] fp32."""
        if self.projector is None:
            why = "built with projector_hidden=None" if self.kind == "momentum" else f"source {self.source!r}"
            raise ValueError(f"lut_targets needs a momentum teacher with a projector; this one has none ({why})")
        if view1.shape != view2.shape:
            raise ValueError(f"views differ in shape: {tuple(view1.shape)} vs {tuple(view2.shape)}")
        self._check_loaded()
        # one forward for both views: in eval mode LayerNorm and BN act per sample, so this is exact
        x = self._check_images(torch.cat([view1, view2]))
        enc = self.encoder
        with self._autocast():
            z = enc.norm(enc.forward_features_until(x, self.cfg.depth))[:, 1:].mean(dim=1)
            t = self.projector(z)
        return t.float().chunk(2)

    def _autocast(self):
        # bf16 AMP only on CUDA: on CPU it is slower than fp32 for these shapes
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _check_images(self, images: Tensor) -> Tensor:
        want = (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images {tuple(images.shape)}, teacher expects "
                             f"[N, {', '.join(map(str, want))}]")
        return images.to(self.device, non_blocking=True)

    def _check_loaded(self) -> None:
        if self.version < 0:
            raise RuntimeError(f"{self.source} teacher has no weights yet: load_state first")

    def _check_holds(self, strategy: Strategy, block: int | None) -> None:
        """An online teacher holds what `strategy` reads at `block`; logs a non-default source once."""
        lacking = [p for p in state_prefixes(strategy.needs, block) if not p.startswith(self._prefixes)]
        if lacking:
            raise ValueError(f"online teacher holds only {list(self._prefixes)}; strategy "
                             f"{strategy.name!r} at block {block} also reads {lacking}: "
                             f"build it with strategy={strategy.name!r}")
        if self.kind != DEFAULT_SOURCE.get(strategy.name) and strategy.name not in self._noted:
            self._noted.add(strategy.name)
            log.warning("strategy %r runs on a %r teacher; its paper uses %r (docs/methods.md 'Decisions')",
                        strategy.name, self.source, DEFAULT_SOURCE.get(strategy.name))
