"""`mimpipe train`: MAE pre-training fed by the plan, with masks from random, in-loop or a server.

torchrun-ready: every rank has its own plan slice, loader and mask source; DDP over gloo on the
CPU, NCCL on GPUs. The loop (`train`) reads in execution order; everything it calls is small.
Checkpoints hold model, EMA teacher, optimizer, scaler, plan cursor and mask-source state (PLB's
head probabilities and epoch sums); since data, crops and mask noise are pure functions of (seed,
epoch, step, rank), a resumed run sees exactly the batches and masks an uninterrupted one would have.
Extra loss terms (`--lut W --mto W --mam W --contrastive W`, weight 0 = off) are train/objective.py;
`compute_losses` feeds them their teacher targets. bf16 autocast on CUDA only; CPU stays fp32 and
deterministic.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from mimpipe.pipeline.decode import HW_DECODER_LOAD
from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import add_plan_arguments, batch_generator, plan_config_from_args
from mimpipe.tools.argtypes import float_range, nonneg_float, nonneg_int, positive_float, positive_int, unit_float
from mimpipe.tools.config import write_config
from mimpipe.maskserver.strategies import plb_update
from mimpipe.train.checkpoint import load_checkpoint, save_checkpoint
from mimpipe.train.device import DEVICES, choose_device
from mimpipe.train.losses import LOSSES, per_head_loss_stats
from mimpipe.train.masks import InloopMasks, RandomMasks, ServerMasks, StopRequested
from mimpipe.maskserver.score_cache import check_flags
from mimpipe.maskserver.teacher import default_source
from mimpipe.train.mask_quality import MaskQuality, foreground
from mimpipe.train.metrics import LossAccumulator, MetricsLog, Progress, StepTimer, plot_curves
from mimpipe.train.model import MODELS, MaskedAutoencoderViT, load_encoder_weights, model_config, read_checkpoint
from mimpipe.train.objective import TERMS, Student, attach_heads, ema_targets, second_view_mask
from mimpipe.train.optim import Schedule, ema_momentum, ema_update, lr_at, param_groups

log = logging.getLogger("mimpipe.train")
CKPT_VERSION = 2   # 2: with a digest of every tensor (train/checkpoint.py)
RUN_CONFIG = "config.yaml"   # OUT/config.yaml: the resolved flags; `--resume` reads it (tools/cli.py)


@dataclass(frozen=True)
class TrainConfig:
    shards: str
    out: str = "runs/train"
    model: str = "mae_vit_tiny_patch8_64"
    masks: str = "random"            # random | inloop:<strategy> | tcp://host:port
    mask_ratio: float = 0.75
    teacher_source: str | None = None  # default: the strategy's paper choice (docs/methods.md)
    epochs: int = 1
    max_steps: int | None = None     # stop early (global optimizer-free iterations)
    batch_size: int = 64             # per rank
    accum: int = 1
    blr: float = 1.5e-4
    lr: float | None = None          # absolute peak lr; default blr * effective batch / 256 (MAE)
    min_lr: float = 0.0
    norm_pix_loss: bool = True       # MAE's --norm_pix_loss, on in every MAE recipe
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    ema_m0: float = 0.996
    sync_every: int | None = None   # default by teacher source: SYNC_EVERY
    seed: int = 0
    init: str | None = None          # warm start: weights only (see warm_start)
    device: str = "auto"             # auto | cuda | cpu (train/device.py)
    decoder: str = "dali"
    dali_prefetch: int = 2           # batches DALI's pipelined executor works ahead
    hw_decoder_load: float = HW_DECODER_LOAD   # JPEGs for the GPU's hardware decoder (A100/H100)
    threads: int = 2
    ckpt_every: int = 0              # iterations; 0 = only at the end (and on SIGTERM)
    keep_last: int = 1               # checkpoint.pt and the keep_last - 1 before it (checkpoint-it*.pt)
    save_every_epochs: int = 0       # also checkpoint-epochE.pt every N epochs, kept (MAE: 20)
    log_every: int = 1               # metrics.jsonl rows (and the loss's host sync) every N iterations
    print_every: int = 20            # a progress line every N iterations when stderr is no terminal
    tensorboard: bool = False        # also RUN/tb (rank 0)
    mask_quality: bool = True        # per-epoch mask statistics (train/mask_quality.py)
    wandb: str | None = None         # Weights & Biases project (rank 0); WANDB_MODE=offline works
    # the plan (pipeline/plan.py add_plan_arguments): must match the mask server's
    img_size: int | None = None
    interpolation: str = "bicubic"
    remainder: str = "pad"
    views: str = "rrc"
    crop_scale: str = "0.2,1.0"
    flip: float = 0.5
    # mask server client (--masks tcp://...)
    strategy: str = "sbam"           # what the server runs: decides which weights to send it
    credits: int = 4
    mask_timeout: float = 30.0
    mask_policy: str = "wait"
    score_cache: int = 0             # in-loop: cached teacher scores, refreshed every K epochs (0 = exact)
    score_cache_dir: str | None = None
    heartbeat: float = 1.0
    server_lut: bool = False         # the server runs --lut: it gets the EMA projector, sends t1/t2
    curve: str | None = None         # `mimpipe keys` folder: CURVE to the server (maskserver/keys.py client_curve)
    # extra loss terms (train/objective.py): weight, 0 = off; defaults for the switch in losses.LOSSES
    lut: float = 0.0
    mto: float = 0.0
    mam: float = 0.0
    contrastive: float = 0.0
    head_hidden: int = 4096          # LUT projector/predictor hidden width (docs/methods.md 2.4)
    contrastive_tau: float = 0.2     # CAMAE Eq. 1

    @property
    def weights(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in TERMS}


def setup_distributed(device: str = "auto") -> tuple[int, int]:
    """(rank, world size); on a GPU machine also makes this rank's GPU (torchrun's LOCAL_RANK) the
    current device, before NCCL starts, so the model, DALI and the teacher all land on it. A GPU
    that is meant but unusable is an error (train/device.py), never a silent CPU run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = choose_device(device) == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# --sync-every's default by teacher source. online: the teacher is the student (SBAM reads its
# embedding), so every step; momentum: the EMA moves (1 - m) of its gap to the student a step (0.4%
# at m 0.996), 10 steps ~4%, while each upload is a ViT-B snapshot (172 MB bf16); frozen: never
SYNC_EVERY = {"online": 1, "momentum": 10, "frozen": 0}


def sync_every(cfg: TrainConfig) -> tuple[str, int]:
    """(teacher source kind, iterations between weight uploads; 0 = never) for this run's masks."""
    if cfg.masks == "random":
        return "none", 0
    strategy = cfg.masks.split(":", 1)[1] if cfg.masks.startswith("inloop:") else cfg.strategy
    kind = (cfg.teacher_source or default_source(strategy)).split(":", 1)[0]
    return kind, 0 if kind == "frozen" else cfg.sync_every or SYNC_EVERY.get(kind, 1)


def server_of(rank: int, servers: int, world: int) -> int:
    """Which of `servers` listed endpoints serves `rank`: contiguous blocks of ranks (each server's
    --ranks; tools/launch.py starts servers with exactly these)."""
    return rank * servers // world


def make_masks(cfg: TrainConfig, rank: int, world: int, num_patches: int, plan_hash: str,
               cursor: tuple[int, int], device: torch.device, run_id: str | None = None, loader=None):
    if (cfg.score_cache or cfg.score_cache_dir) and not cfg.masks.startswith("inloop:"):
        raise ValueError(f"--score-cache/--score-cache-dir: for --masks inloop:<strategy>; with --masks "
                         f"{cfg.masks!r} {'set them on the mask server' if '://' in cfg.masks else 'there is no teacher'}")
    check_flags(cfg.score_cache, cfg.score_cache_dir)
    if cfg.masks == "random":
        return RandomMasks(num_patches, cfg.mask_ratio, cfg.seed, rank)
    if cfg.masks.startswith("inloop:"):
        return InloopMasks(cfg.masks.split(":", 1)[1], cfg.model, ratio=cfg.mask_ratio, seed=cfg.seed,
                           rank=rank, source=cfg.teacher_source, epochs=cfg.epochs, device=device,
                           img_size=cfg.img_size, score_cache=cfg.score_cache, loader=loader,
                           score_cache_dir=None if cfg.score_cache_dir is None else
                           str(Path(cfg.score_cache_dir) / f"rank{rank}"))
    if cfg.masks.startswith(("tcp://", "ipc://")):
        endpoints = cfg.masks.split(",")
        mine = server_of(rank, len(endpoints), world)
        return ServerMasks(endpoints[mine], others=endpoints[mine + 1:] + endpoints[:mine], strategy=cfg.strategy,
                           model=cfg.model, source=cfg.teacher_source, rank=rank, world_size=world,
                           plan_hash=plan_hash, cursor=cursor, num_patches=num_patches,
                           ratio=cfg.mask_ratio, seed=cfg.seed, credits=cfg.credits,
                           mask_timeout=cfg.mask_timeout, policy=cfg.mask_policy, heartbeat=cfg.heartbeat,
                           projector=cfg.server_lut, run_id=run_id, curve=cfg.curve, mam=cfg.mam > 0,
                           epochs=cfg.epochs)
    raise ValueError(f"--masks {cfg.masks!r}: choose random, inloop:<strategy> or tcp://host:port[,...]")


class Run:
    """Everything a checkpoint restores, built the same way for a fresh and a resumed run."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        # the current GPU (setup_distributed chose it) or the CPU; the loader's DALI graph decodes
        # onto the same device ('auto'), and masks and targets are moved there per step
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if choose_device(cfg.device) == "cuda" else torch.device("cpu")
        # the model at --img-size (MAE's --input_size: a new patch grid and sin-cos table)
        mc = model_config(cfg.model, img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss)
        self.manifest = load_manifest(cfg.shards)
        self.plan_cfg = plan_config_from_args(SimpleNamespace(**asdict(cfg), world_size=world), mc.img_size)
        self.loader = Loader(self.manifest, self.plan_cfg, rank, decoder=cfg.decoder, threads=cfg.threads,
                             dali_prefetch=cfg.dali_prefetch, hw_decoder_load=cfg.hw_decoder_load,
                             device="gpu" if self.device.type == "cuda" else "cpu", device_id=self.device.index)
        if (cfg.lut or cfg.contrastive) and len(self.plan_cfg.views) < 2:
            raise ValueError(f"--lut/--contrastive need two views per image, e.g. --views src,src+color "
                             f"(got --views {cfg.views!r})")
        if cfg.server_lut and not (cfg.lut or cfg.contrastive):
            raise ValueError("--server-lut sends the EMA projector, which exists only with --lut or "
                             "--contrastive")
        with torch.random.fork_rng():   # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(cfg.seed)
            self.model = MaskedAutoencoderViT(mc)
            self.ema = MaskedAutoencoderViT(mc, encoder_only=True)
            attach_heads(self.model, self.ema, cfg.weights, cfg.head_hidden)
        if cfg.init:
            warm_start(self.model, cfg.init)
        self.model.to(self.device)
        self.ema.to(self.device)
        # eval: the momentum projector's BN uses its (EMA'd) running statistics (docs/methods.md 2.3)
        self.ema.requires_grad_(False).eval()
        self.ema.load_state_dict({k: v for k, v in self.model.state_dict().items()
                                  if k in self.ema.state_dict()})
        student = Student(self.model, cfg.weights, tau=cfg.contrastive_tau,
                          gather=_all_gather if world > 1 else None, rank=rank)
        self.ddp = student if world == 1 else torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # PLB (docs/methods.md 5.3) for an in-loop idm source: p [M], last epoch's L^m, this epoch's sums
        M = mc.num_heads
        self.plb = {"p": None, "prev": None, "sum": torch.zeros(M, dtype=torch.float64),
                    "count": torch.zeros(M, dtype=torch.float64)}
        # fused: one kernel for all parameters on CUDA (the foreach path otherwise)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=0.0, betas=(0.9, 0.95),
                                     fused=self.device.type == "cuda")
        eff = cfg.batch_size * world * cfg.accum
        self.sched = Schedule(lr=cfg.lr if cfg.lr is not None else cfg.blr * eff / 256, epochs=cfg.epochs,
                              warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr)
        self.mc, self.masks = mc, None   # the mask source starts at the cursor: see start_masks
        self.it = 0   # iterations done, over every launch of the run
        self.epoch = self.step = 0   # the cursor: the next batch is (epoch, step) of the plan
        # the run's identity, kept across --resume: a mask server hands a live rank back only to it
        self.run_id = _broadcast(secrets.token_hex(16)) if world > 1 else secrets.token_hex(16)
        self.saved_it: int | None = None   # of this run's checkpoint.pt (keep_last's links name it)
        if rank == 0:
            log.info("effective batch %d, peak lr %.3g, %d steps/epoch, plan %s",
                     eff, self.sched.lr, self.loader.steps, self.loader.plan.hash)

    @property
    def ckpt_path(self) -> Path:
        return Path(self.cfg.out) / "checkpoint.pt"

    def start_masks(self) -> None:
        if self.loader.plan.offset(self.epoch) and self.cfg.masks.startswith(("tcp://", "ipc://")):
            raise ValueError(f"{self.ckpt_path}: an elastic resume (another world size or batch size mid-epoch) "
                             f"cannot use a mask server yet: its plan has no resume offset; finish the epoch "
                             f"with the old layout, or resume at an epoch boundary")
        self.masks = make_masks(self.cfg, self.rank, self.world, self.mc.num_patches,
                                self.loader.plan.hash, (self.epoch, self.step), self.device, self.run_id,
                                loader=self.loader)
        if isinstance(self.masks, InloopMasks) and self.plb["p"] is not None:
            self.masks.head_probs = self.plb["p"].float()   # as the server passes its float64 p

    def save(self) -> None:
        if self.rank != 0:
            return
        plan = self.loader.plan
        # the cursor twice: (epoch, step) for an exact resume, and the samples the epoch consumed,
        # which any other layout of the same data plan continues from (elastic resume)
        state = {"version": CKPT_VERSION, "config": asdict(self.cfg), "world": self.world, "it": self.it,
                 "epoch": self.epoch,
                 "step": self.step, "consumed": plan.consumed(self.epoch, self.step),
                 "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.opt.state_dict(), "plan_hash": plan.hash, "data_hash": plan.data_hash,
                 "plb": dict(self.plb), "run_id": self.run_id}
        out, steps = self.ckpt_path.parent, self.loader.steps
        prev = self.saved_it
        if self.cfg.keep_last > 1 and prev is not None and prev != self.it and self.ckpt_path.exists():
            # the previous checkpoint stays as a hard link: checkpoint.pt is replaced, never missing
            kept = out / f"checkpoint-it{prev:08d}.pt"
            kept.unlink(missing_ok=True)
            os.link(self.ckpt_path, kept)
            for old in sorted(out.glob("checkpoint-it*.pt"))[:-(self.cfg.keep_last - 1)]:
                old.unlink()
        save_checkpoint(state, self.ckpt_path)
        self.saved_it = self.it
        every = self.cfg.save_every_epochs
        if every and self.it % steps == 0 and (self.it // steps) % every == 0:
            # MAE's checkpoint-<epoch>.pth: kept for good (a hard link, no second write)
            snap = out / f"checkpoint-epoch{self.it // steps - 1:04d}.pt"
            snap.unlink(missing_ok=True)
            os.link(self.ckpt_path, snap)

    def load(self) -> None:
        state = load_checkpoint(self.ckpt_path)
        if state.get("version") != CKPT_VERSION:
            raise ValueError(f"{self.ckpt_path}: checkpoint format {state.get('version')}, this mimpipe "
                             f"writes and resumes {CKPT_VERSION}")
        if (was := state.get("config", {}).get("model")) != self.cfg.model:
            raise ValueError(f"{self.ckpt_path}: written by --model {was}, this run has --model "
                             f"{self.cfg.model}")
        plan = self.loader.plan
        if state["data_hash"] != plan.data_hash:
            raise ValueError(f"{self.ckpt_path}: written for data plan {state['data_hash']}, this run's is "
                             f"{plan.data_hash} (other data, seed, image size, crops or views)")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.it = self.saved_it = int(state["it"])
        self.plb.update(state.get("plb") or {})
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.run_id = state["run_id"]
        if state["plan_hash"] == plan.hash:
            return "the same layout: exactly the batches an uninterrupted run sees"
        plan.resume_at(self.epoch, int(state["consumed"]))
        self.step = 0
        return (f"elastic: world size {state['world']} x batch {state['config']['batch_size']} -> {self.world} x "
                f"{self.cfg.batch_size}; the epoch goes on from its consumed samples")


def warm_start(model: MaskedAutoencoderViT, path: str) -> None:
    """--init: the student starts from a file's weights, with a fresh optimizer, schedule and
    cursor (SBAM's recipe starts from a checkpoint pre-trained with random masks, docs/methods.md 7 #4).
    The file is a `mimpipe train` checkpoint, an MAE release checkpoint or a timm ViT: every encoder
    tensor must be there; decoder and loss heads are taken where the file has them, else stay fresh."""
    sd = read_checkpoint(path)
    encoder = MaskedAutoencoderViT(model.cfg, encoder_only=True)
    try:   # every encoder tensor, shapes checked; decoder and heads are the optional rest
        load_encoder_weights(encoder, sd)
    except ValueError as e:
        raise ValueError(f"--init {path}: {e}") from None
    own, enc = model.state_dict(), encoder.state_dict()
    rest = {k: v for k, v in sd.items() if k in own and k not in enc}
    bad = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in rest.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"--init {path}: shape mismatch {bad}")
    model.load_state_dict({**enc, **rest}, strict=False)
    log.info("--init %s: encoder and %d of %d decoder/head tensors loaded, the rest fresh",
             path, len(rest), len(own) - len(enc))


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """resume: continue from OUT/checkpoint.pt if there is one, else start fresh (a requeued job
    passes it on every launch); on another world size or per-rank batch the interrupted epoch goes
    on from the samples it consumed (Run.load). overwrite: start fresh in an OUT that holds an
    earlier run."""
    if cfg.ckpt_every % cfg.accum:
        raise ValueError(f"--ckpt-every {cfg.ckpt_every} must be a multiple of --accum {cfg.accum}: "
                         f"a checkpoint holds no half-accumulated gradients")
    out = Path(cfg.out)
    # a run's own files, not whatever else shares the folder (launch's server logs, a job's output)
    earlier = [p.name for pattern in ("checkpoint*.pt", "metrics*.jsonl") for p in out.glob(pattern)]
    if not (resume or overwrite) and earlier:
        raise ValueError(f"--out {out} holds an earlier run ({', '.join(sorted(earlier)[:3])}): pass --resume "
                         f"to continue it or --overwrite to start again there")
    rank, world = setup_distributed(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, rank, world)
    plan = run.loader.plan
    if resume and run.ckpt_path.is_file():
        how = run.load()
        if rank == 0:
            log.info("resumed from %s at iteration %d: epoch %d, %d of %d samples done (%s)", run.ckpt_path,
                     run.it, run.epoch, plan.consumed(run.epoch, run.step), plan.n, how)
    elif resume and rank == 0:
        log.info("--resume: no %s yet, starting fresh", run.ckpt_path)
    if rank == 0:
        write_config(out / RUN_CONFIG, asdict(cfg))
        (out / "STOPPED").unlink(missing_ok=True)
    run.start_masks()
    kind, every = sync_every(cfg)
    if rank == 0 and every:
        log.info("teacher weights (%s) every %d iteration(s)%s: masks use weights up to %d step(s) old%s", kind, every,
                 "" if cfg.sync_every else " (its default)", every - 1,
                 f", + the {cfg.credits} credits and the server's --max-ahead batches made ahead"
                 if isinstance(run.masks, ServerMasks) else "")
    # iterations left to the planned end; --max-steps stops earlier, the schedules still follow --epochs
    left = sum(plan.steps_in(e) for e in range(run.epoch, cfg.epochs)) - run.step
    total = run.it + left if cfg.max_steps is None else min(run.it + left, cfg.max_steps)
    stop = StopSignal(world)
    stopped = False
    if isinstance(run.masks, ServerMasks):
        # a signal ends a wait for masks within a fraction of a second on one rank; several ranks
        # must agree at the next step instead (one rank leaving alone would hang the others)
        run.masks.should_stop = (lambda: stop.local) if world == 1 else None
    run.masks.sync(run.it, run.model, run.ema)
    # every rank logs: per-rank data and mask waits are what profiling needs; rows past the
    # checkpoint (steps a killed run did after its last save) are dropped, they run again
    metrics = MetricsLog(out, rank, keep_until=run.it, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                         config=asdict(cfg))
    progress = Progress(total, run.it, cfg.batch_size * world, enabled=rank == 0)
    acc = LossAccumulator()
    timer = StepTimer(run.device)
    quality = MaskQuality(plan.n, run.mc.num_patches) if cfg.mask_quality else None
    has_fg = cfg.mask_quality   # until a batch without foreground says otherwise
    epoch_stats = {}
    while run.it < total and not stopped:
        epoch, steps = run.epoch, plan.steps_in(run.epoch)
        batches = run.loader.epoch(epoch, run.step)
        t_data = time.perf_counter()
        for batch in batches:
            data_wait = time.perf_counter() - t_data
            progress_epochs = plan.progress(epoch, run.step)   # fractional epoch, as MAE sets the lr
            for g in run.opt.param_groups:
                g["lr"] = lr_at(progress_epochs, run.sched)
            try:
                masks = run.masks.get(batch)
            except StopRequested as e:   # the last step was whole: its checkpoint can be written
                log.info("%s", e)
                stopped = True
                if run.it % cfg.accum == 0:
                    run.save()
                break
            if quality is not None:
                fg = foreground(run.loader.reader, plan, batch, run.mc.img_size, run.mc.patch_size) \
                    if has_fg else None
                has_fg = fg is not None
                # host sync only for an in-loop teacher's GPU mask (--no-mask-quality avoids it)
                quality.add(masks.mask.cpu().numpy(), batch.sample_ids.numpy(), batch.valid.numpy(),
                            *(fg or (None, None)))
            timer.start()
            boundary = (run.it + 1) % cfg.accum == 0
            # accumulation micro-steps keep their gradients local: one all-reduce per optimizer step
            with run.ddp.no_sync() if world > 1 and not boundary else contextlib.nullcontext():
                loss, parts, per_image = compute_losses(run, batch, masks)
                (loss / cfg.accum).backward()
            if per_image is not None:   # idm masks: PLB statistics (docs/methods.md 5.3)
                plb_feedback(run, batch, masks, per_image)
            if boundary:
                run.opt.step()
                run.opt.zero_grad(set_to_none=True)
                ema_update(run.ema, run.model, ema_momentum(progress_epochs, cfg.epochs, cfg.ema_m0))
            run.it += 1
            run.step += 1
            acc.add(loss, parts, data_wait=data_wait, mask_wait=masks.wait_s, compute=timer.stop(),
                    images=len(batch.sample_ids), valid=int(batch.valid.sum()))
            epoch_end = run.step == steps
            if epoch_end:
                plb_epoch_end(run)   # before any checkpoint at this iteration: it holds the new p
                epoch_stats = quality.epoch_end() if quality is not None else {}
                run.epoch, run.step = epoch + 1, 0
            if every and run.it % every == 0:
                run.masks.sync(run.it, run.model, run.ema)
            save = boundary and ((cfg.ckpt_every and run.it % cfg.ckpt_every == 0) or (
                epoch_end and cfg.save_every_epochs and run.epoch % cfg.save_every_epochs == 0))
            stopped = boundary and stop.agreed()
            if run.it % cfg.log_every == 0 or run.it == total or save or stopped or epoch_stats:
                row = acc.pop(f"rank {rank}, epoch {epoch}, step {batch.step}")   # sync point: the losses
                row["compute"] += timer.pop()
                metrics.write({
                    "it": run.it, "epoch": epoch, "step": batch.step, **row,
                    "lr": run.opt.param_groups[0]["lr"], "teacher_version": masks.teacher_version,
                    "staleness": None if masks.teacher_step is None else run.it - 1 - masks.teacher_step,
                    "fallback": masks.fallback, **epoch_stats})
                epoch_stats = {}
                progress.update(run.it, epoch, row, run.opt.param_groups[0]["lr"], print_every=cfg.print_every)
            if save or stopped:
                run.save()
            if run.it >= total or stopped:
                break
            t_data = time.perf_counter()
        batches.close()
    acc.pop(f"rank {rank}, iteration {run.it}")   # nothing non-finite since the last row is saved either
    if not stopped:
        run.save()
    run.masks.close()
    run.loader.close()
    metrics.close()
    progress.close()
    if rank == 0:
        plot_curves(out / "metrics.jsonl", out / "loss.png")
        if stopped:   # OUT/STOPPED: what a job script checks to requeue itself
            (out / "STOPPED").write_text(f"iteration {run.it} of {total}\n")
            log.info("%s: stopped at iteration %d (epoch %d, step %d), checkpoint written", stop.signal or
                     "a signal on another rank", run.it, run.epoch, run.step)
    if world > 1:
        dist.barrier()   # rank 0's checkpoint is on disk before any rank reports and exits
        dist.destroy_process_group()
    return {"it": run.it, "total": total, "stopped": stopped, "first_loss": progress.first_loss,
            "last_loss": progress.last_loss}


def compute_losses(run: Run, batch, masks):
    """One step's forward -> (total, parts {name: scalar}, per_image [N] or None).

    Gathers what the terms need besides the student: LUT's second view and its disjoint mask (drawn
    with the batch's generator, so random masks give LUT's own permutation, docs/methods.md 2.2); teacher
    targets from the mask source's extras (a server with --lut sends lut_t1/t2) or else from the EMA
    encoder + projector here (docs/methods.md 2.3: the same computation); MAM's gpa_target only from the
    mask source (the GPA teacher is the mask strategy's).
    """
    cfg, dev = run.cfg, run.device
    images = batch.images.to(dev, non_blocking=True)   # already there when DALI decoded on the GPU
    view2 = None if batch.view2 is None else batch.view2.to(dev, non_blocking=True)
    # the mask goes to the model as it came: a CPU mask is checked there and copied without
    # blocking (model.given_mask); the teacher's targets likewise, through pinned memory
    mask = masks.mask
    targets = {k: to_device(v.float() if v.is_floating_point() else v, dev) for k, v in masks.extras.items()}
    mask2 = None
    if cfg.lut:   # CPU noise on every machine: the same draws as a CPU run's (CUDA's RNG differs)
        g = batch_generator(cfg.seed, batch.epoch, batch.step, run.rank)
        mask2 = second_view_mask(masks.mask.cpu(), g)   # host sync only for an in-loop GPU teacher's mask
    skip = ()
    if cfg.mam and "gpa_target" not in targets:
        if not masks.fallback:
            raise ValueError(f"--mam needs the mask source's 'gpa_target' (GPA values, docs/methods.md 3.5): use "
                             f"--masks inloop:gpa or a server with --strategy gpa; --masks {cfg.masks!r} "
                             f"gave {sorted(masks.extras) or 'no extras'}")
        # the server missed this batch and random masks stand in: no GPA target, no MAM term
        targets["gpa_target"], skip = torch.zeros(tuple(mask.shape), device=dev), ("mam",)
    with _autocast(run.model):
        if cfg.contrastive or (cfg.lut and not {"lut_t1", "lut_t2"} <= targets.keys()):
            targets = {**ema_targets(run.ema, images, view2), **targets}
        return run.ddp(images, mask, len_keep=masks.len_keep, view2=view2, mask2=mask2, targets=targets,
                       want_per_image="heads" in masks.extras, skip=skip)


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor to the GPU without a host sync (a copy from pageable memory waits for the
    stream); on the CPU, or already there, as it is."""
    if dev.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def plb_feedback(run: Run, batch, masks, per_image: torch.Tensor) -> None:
    """Per-head sums of the per-image losses (padding rows excluded): to the server, which updates
    p itself at its epoch end, or into this epoch's sums for an in-loop source."""
    # host sync (idm only): the per-image losses go to the server, or into the epoch sums, per step
    s, c = per_head_loss_stats(per_image.float().cpu(), masks.extras["heads"].long().cpu(), run.mc.num_heads,
                               valid=torch.as_tensor(batch.valid))
    if isinstance(run.masks, ServerMasks):
        run.masks.client.send_feedback(batch.epoch, batch.step, s.numpy(), c.numpy())
    else:
        run.plb["sum"] += s.double()
        run.plb["count"] += c.double()


def plb_epoch_end(run: Run) -> None:
    """PLB (docs/methods.md 5.3), in-loop source: p <- plb_update(p, epoch sums of all ranks), as
    maskserver/server.py does; the next epoch's idm masks sample heads from the new p."""
    if not isinstance(run.masks, InloopMasks):
        return
    s, c = run.plb["sum"], run.plb["count"]
    if run.world > 1:   # sync point, once per epoch; NCCL reduces only tensors on the rank's GPU
        s, c = s.to(run.device), c.to(run.device)
        dist.all_reduce(s)
        dist.all_reduce(c)
        s, c = s.cpu(), c.cpu()
    if c.sum() > 0 or run.plb["prev"] is not None:
        M = len(s)
        p = run.plb["p"] if run.plb["p"] is not None else torch.full((M,), 1.0 / M, dtype=torch.float64)
        run.plb["p"], run.plb["prev"] = plb_update(p, s, c, run.plb["prev"])
        run.masks.head_probs = run.plb["p"].float()
        if run.rank == 0:
            log.info("PLB: p = %s", [round(x, 4) for x in run.plb["p"].tolist()])
    run.plb["sum"], run.plb["count"] = torch.zeros_like(s), torch.zeros_like(c)


def _autocast(model: torch.nn.Module):
    """bf16 autocast where the model lives on CUDA; a no-op on CPU (fp32, deterministic)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def _broadcast(value: str) -> str:
    """Rank 0's value on every rank (a collective)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Contrastive keys of every rank (no gradient: keys are stop-grad), rank order."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class StopSignal:
    """SIGTERM / SIGINT end the run at the next optimizer step, with a checkpoint, on every rank at
    the same iteration: a rank that stopped alone would leave the others hanging in NCCL, and a
    late rank 0 would write no checkpoint. The flag is MAX-reduced over a gloo group each
    optimizer step (CPU only: no GPU stream or host sync involved). Handlers can only be installed
    from the main thread; elsewhere (a test runner's thread) signals are not caught."""

    def __init__(self, world: int):
        self.local = False
        self.signal: str | None = None
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.local, self.signal = True, signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank once any rank got a signal; a collective: call it at the same points."""
        if self.group is None:
            return self.local
        flag = torch.tensor([int(self.local)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())   # a CPU tensor: no device sync


def add_arguments(p) -> None:
    """Our flags, with MAE's main_pretrain.py names as aliases (`--accum_iter`, `--input_size`, ...);
    every range is checked by the parser (tools/argtypes.py)."""
    d = TrainConfig(shards="")
    g = p.add_argument_group("data and run")
    g.add_argument("--shards", "--data_path", required=True, help="dataset folder written by `mimpipe shard`")
    g.add_argument("--out", "--output_dir", default=d.out, help="run folder: checkpoint, metrics, config.yaml")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt with OUT/config.yaml's "
                   "flags (the command line still wins); starts fresh when there is no checkpoint yet, "
                   "so a requeued job can always pass it")
    g.add_argument("--overwrite", action="store_true", help="start again in an OUT that holds an earlier run")
    g.add_argument("--init", metavar="PATH", help="start the student from these weights (mimpipe or MAE "
                   "checkpoint, timm ViT) with a fresh optimizer and schedule; --resume wins over it")
    g.add_argument("--epochs", type=positive_int, default=d.epochs)
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many iterations "
                   "(the schedules still follow --epochs)")
    g.add_argument("--device", default=d.device, choices=DEVICES, help="auto: this rank's GPU (LOCAL_RANK) "
                   "where CUDA works; an unusable GPU that is meant is an error, pass cpu to mean the CPU")
    g.add_argument("--decoder", default=d.decoder, choices=["dali", "pil"])
    g.add_argument("--threads", type=positive_int, default=d.threads, help="decoder threads per rank (per GPU)")
    g.add_argument("--dali-prefetch", type=positive_int, default=d.dali_prefetch,
                   help="batches DALI's pipelined executor decodes ahead")
    g.add_argument("--hw-decoder-load", type=unit_float, default=d.hw_decoder_load,
                   help="share of JPEG decoding on the GPU's nvJPEG hardware engine (where it has one)")
    g.add_argument("--ckpt-every", type=nonneg_int, default=d.ckpt_every,
                   help="iterations between checkpoints; 0 = at the end (and on SIGTERM) only")
    g.add_argument("--keep-last", type=positive_int, default=d.keep_last,
                   help="checkpoints kept: checkpoint.pt and the K-1 before it as checkpoint-itN.pt")
    g.add_argument("--save-every-epochs", type=nonneg_int, default=d.save_every_epochs,
                   help="also keep checkpoint-epochE.pt every N epochs (MAE keeps one every 20); 0 = off")
    g.add_argument("--log-every", type=positive_int, default=d.log_every,
                   help="iterations per metrics.jsonl row; each row is one host sync (GPU: use 20)")
    g.add_argument("--print-every", type=positive_int, default=d.print_every,
                   help="iterations between progress lines when stderr is not a terminal (SLURM, nohup)")
    g.add_argument("--mask-quality", action=argparse.BooleanOptionalAction, default=d.mask_quality,
                   help="per-epoch mask recall (where the data has foreground), entropy, overlap with the "
                   "previous epoch and the ratio histogram, on the epoch's last metrics row")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=d.tensorboard,
                   help="also write rank 0's metrics to OUT/tb")
    g.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log rank 0's metrics to Weights & Biases (WANDB_MODE=offline to stay local)")
    g = p.add_argument_group("model and objective")
    g.add_argument("--model", default=d.model, choices=list(MODELS), metavar="NAME",
                   help=f"one of {', '.join(MODELS)}")
    g.add_argument("--mask-ratio", "--mask_ratio", type=float_range(0, 1, lo_open=True, hi_open=True),
                   default=d.mask_ratio, help="share of patches masked, in (0, 1)")
    g.add_argument("--norm-pix-loss", "--norm_pix_loss", action=argparse.BooleanOptionalAction,
                   default=d.norm_pix_loss, help="MAE's per-patch normalized pixel target")
    for name in TERMS:
        g.add_argument(f"--{name}", type=nonneg_float, nargs="?", const=LOSSES[name].weight, default=0.0,
                       metavar="W", help=f"add the {name} loss with weight W (bare flag: "
                       f"{LOSSES[name].weight}, {LOSSES[name].why}); 0 = off")
    g.add_argument("--head-hidden", type=positive_int, default=d.head_hidden, help="LUT/contrastive head width")
    g.add_argument("--contrastive-tau", type=positive_float, default=d.contrastive_tau)
    g = p.add_argument_group("optimization (MAE's recipe)")
    g.add_argument("--accum", "--accum_iter", type=positive_int, default=d.accum,
                   help="gradient accumulation steps; effective batch = batch-size x world size x accum")
    g.add_argument("--blr", type=positive_float, default=d.blr, help="base lr: lr = blr x effective batch / 256")
    g.add_argument("--lr", type=positive_float, default=None, help="absolute peak lr (overrides --blr)")
    g.add_argument("--min-lr", "--min_lr", type=nonneg_float, default=d.min_lr, help="cosine schedule's floor")
    g.add_argument("--warmup-epochs", "--warmup_epochs", type=nonneg_float, default=d.warmup_epochs)
    g.add_argument("--weight-decay", "--weight_decay", type=nonneg_float, default=d.weight_decay)
    g.add_argument("--ema-m0", type=float_range(0, 1), default=d.ema_m0,
                   help="EMA teacher momentum at the start, cosine to 1 (LUT)")
    g = p.add_argument_group("masks")
    g.add_argument("--masks", default=d.masks, help="random | inloop:<strategy> | tcp://host:port[,...]")
    g.add_argument("--teacher-source", default=None, help="online | momentum | frozen:PATH "
                   "(default: the strategy's paper choice)")
    g.add_argument("--sync-every", type=positive_int, default=d.sync_every,
                   help="iterations between weight uploads to the mask teacher (default: 1 online, 10 momentum; "
                   "frozen: never)")
    g.add_argument("--score-cache", type=nonneg_int, default=d.score_cache, metavar="K",
                   help="with --masks inloop:gpa|idm|attmask: the mask server's score cache in this process "
                        "(each image's teacher score on its whole view, resampled onto every crop, refreshed "
                        "every K epochs; a frozen teacher: never); 0 = exact (docs/methods.md 8)")
    g.add_argument("--score-cache-dir", default=d.score_cache_dir, metavar="DIR",
                   help="keep the in-loop score cache memory-mapped in DIR/rankR")
    g.add_argument("--strategy", default=d.strategy, help="the mask server's strategy (which weights it needs)")
    g.add_argument("--credits", type=positive_int, default=d.credits, help="batches the server may send ahead")
    g.add_argument("--mask-timeout", type=positive_float, default=d.mask_timeout,
                   help="seconds to wait for a batch's masks before --mask-policy applies")
    g.add_argument("--mask-policy", default=d.mask_policy, choices=["wait", "random", "fail"])
    g.add_argument("--heartbeat", type=positive_float, default=d.heartbeat, help="seconds")
    g.add_argument("--server-lut", action=argparse.BooleanOptionalAction, default=d.server_lut,
                   help="the mask server runs --lut: send it the EMA projector (its hidden width must be "
                   "the server's 4096, --head-hidden), use its LUT targets")
    g.add_argument("--curve", metavar="DIR", default=None, help="CURVE keys from `mimpipe keys`: rank r uses "
                   "DIR/private/client{r %% n}.key_secret of the n there, and DIR/server.key")
    add_plan_arguments(p, world_size=False)


def main(args) -> int:
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**fields)
    r = train(cfg, resume=args.resume, overwrite=args.overwrite)
    done = f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}" if r["first_loss"] is not None else "no new steps"
    if r["stopped"]:
        print(f"stopped at iteration {r['it']} of {r['total']} ({done}), checkpoint {cfg.out}/checkpoint.pt; "
              f"continue with: mimpipe train --out {cfg.out} --resume", file=sys.stderr)
    else:
        print(f"trained {r['it']} iterations, {done}", file=sys.stderr)
    return 0
