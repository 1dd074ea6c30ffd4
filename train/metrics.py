"""What a run reports: per-step metrics as JSON lines (every rank; rank r > 0 to
metrics.rank{r}.jsonl), with `--tensorboard` rank 0's numbers as TensorBoard scalars in RUN/tb and
with `--wandb PROJECT` in Weights & Biases (both optional extras: `pip install 'mimpipe[tb]'`,
`'mimpipe[wandb]'`), progress lines for batch jobs, and the loss/lr picture at the end."""
from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger("mimpipe.train")


class MetricsLog:
    def __init__(self, out: Path, rank: int, *, keep_until: int = 0, tensorboard: bool = False,
                 wandb: str | None = None, config: dict | None = None):
        """keep_until: rows of an earlier run in OUT up to this iteration stay (a resumed run goes on
        from its checkpoint's iteration; the rows a killed run logged after it are dropped, since
        those steps run again), the rest of the file is cut."""
        path = out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if keep_until and json.loads(line)["it"] <= keep_until]
        self.file = open(path, "w")
        self.file.writelines(line + "\n" for line in kept)
        self.file.flush()
        self.tb = self.wandb = None
        if tensorboard and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:   # torch's writer imports the tensorboard package lazily
                raise RuntimeError("--tensorboard needs the tensorboard package: "
                                   "pip install 'mimpipe[tb]' (or tensorboard)") from e
            self.tb = SummaryWriter(str(out / "tb"))
        if wandb and rank == 0:
            try:
                import wandb as wb
            except ImportError as e:
                raise RuntimeError("--wandb needs the wandb package: pip install 'mimpipe[wandb]'") from e
            # resume="allow" with the folder's name as id: a requeued run continues the same chart
            self.wandb = wb.init(project=wandb, dir=str(out), config=config, name=out.name,
                                 id=_wandb_id(out), resume="allow")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        # bools (fallback) count as 0/1; None (no teacher yet) is no point
        scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "it"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["it"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["it"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(out: Path) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(out.resolve()))[-64:]


class LossAccumulator:
    """Loss terms summed on their device between metrics rows, so a step has no host sync; `pop`
    brings them to the host once per row (MAE's MetricLogger syncs every step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.host: dict[str, float] = {}
        self.steps = 0

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], **host: float) -> None:
        """host: numbers already on the host (wait times, image counts), summed over the row."""
        for k, v in {"loss": loss, **{f"loss_{n}": p for n, p in parts.items()}}.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        for k, v in host.items():
            self.host[k] = self.host.get(k, 0) + v
        self.steps += 1

    def pop(self, where: str) -> dict:
        """-> {loss, loss_<term>: mean over the row's steps; the host numbers summed; steps}; a
        non-finite loss raises, naming where, before the caller writes anything."""
        if not self.steps:
            return {}
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]).tolist()   # host sync: once per row
        row = {k: v / self.steps for k, v in zip(names, values)}
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            raise RuntimeError(f"{where}: {', '.join(f'{k} {row[k]}' for k in bad)} over the last "
                               f"{self.steps} step(s): stopping before any checkpoint is written (the "
                               f"last good one stays); lower the lr or check the data and flags")
        row.update(self.host, steps=self.steps)
        self.__init__()
        return row


class StepTimer:
    """The compute time of each step: perf_counter on the CPU; on a GPU a pair of CUDA events
    around the step, read when the metrics row is written (a sync point already), so timing adds
    no host sync to the step and measures the kernels, not their launch."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self.t0 = None

    def start(self) -> None:
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        """-> seconds on the CPU; on a GPU 0.0 now, the time comes with `pop`."""
        if not self.cuda:
            return time.perf_counter() - self.t0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((self.t0, end))
        return 0.0

    def pop(self) -> float:
        """Seconds of the GPU steps stopped since the last pop."""
        if not self.pending:
            return 0.0
        self.pending[-1][1].synchronize()   # host sync: at the metrics row, where the losses sync too
        total = sum(a.elapsed_time(b) for a, b in self.pending) / 1e3
        self.pending = []
        return total


class Progress:
    """A tqdm bar on a terminal; elsewhere (SLURM, nohup) a log line every `print_every` iterations
    with it/s, img/s, loss, lr, the mask and data wait shares and the ETA."""

    def __init__(self, total: int, start: int, images_per_it: int, *, enabled: bool):
        self.total, self.start, self.images_per_it, self.enabled = total, start, images_per_it, enabled
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, unit="it", disable=not (enabled and self.tty))
        self.t0, self.printed = time.perf_counter(), start
        self.first_loss = self.last_loss = None
        self.waits = {"data_wait": 0.0, "mask_wait": 0.0, "step": 0.0}

    def update(self, it: int, epoch: int, row: dict, lr: float, *, print_every: int) -> None:
        self.first_loss = row["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = row["loss"]
        for k in ("data_wait", "mask_wait"):
            self.waits[k] += row[k]
        self.waits["step"] += row["data_wait"] + row["mask_wait"] + row["compute"]
        self.bar.update(it - self.bar.n)
        self.bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4f}", refresh=False)
        if not self.enabled or self.tty or (it - self.printed < print_every and it != self.total):
            return
        self.printed = it
        wall = time.perf_counter() - self.t0
        rate = (it - self.start) / max(wall, 1e-9)
        eta = datetime.timedelta(seconds=round((self.total - it) / max(rate, 1e-9)))
        share = {k: 100 * self.waits[k] / max(self.waits["step"], 1e-9) for k in ("mask_wait", "data_wait")}
        log.info("epoch %d  it %d/%d (%.0f%%)  %.2f it/s  %.1f img/s  loss %.4f  lr %.3g  mask wait %.1f%%  "
                 "data wait %.1f%%  ETA %s", epoch, it, self.total, 100 * it / self.total, rate,
                 rate * self.images_per_it, row["loss"], lr, share["mask_wait"], share["data_wait"], eta)

    def close(self) -> None:
        self.bar.close()


def plot_curves(metrics: Path, png: Path) -> None:
    """loss and lr over iterations, as the demo shows them; skipped without matplotlib (`viz` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("no matplotlib: %s not drawn (pip install 'mimpipe[viz]')", png)
        return
    rows = [json.loads(line) for line in open(metrics)]
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    it = [r["it"] for r in rows]
    a.plot(it, [r["loss"] for r in rows], lw=1)
    a.set(xlabel="iteration", ylabel="loss", title="training loss")
    b.plot(it, [r["lr"] for r in rows], lw=1, color="tab:orange")
    b.set(xlabel="iteration", ylabel="learning rate", title="lr schedule")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
