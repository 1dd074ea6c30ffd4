"""Per-step metrics: JSON lines (every rank; rank r > 0 to metrics.rank{r}.jsonl) and, with
`--tensorboard`, rank 0's numbers as TensorBoard scalars in RUN/tb (the tensorboard package is an
optional extra: `pip install 'mimpipe[tb]'`)."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, out: Path, rank: int, tensorboard: bool = False):
        self.file = open(out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl"), "a")
        self.tb = None
        if tensorboard and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:   # torch's writer imports the tensorboard package lazily
                raise RuntimeError("--tensorboard needs the tensorboard package: "
                                   "pip install 'mimpipe[tb]' (or tensorboard)") from e
            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                # bools (fallback) count as 0/1; None (no teacher yet) is no point
                if isinstance(v, (int, float)) and k != "it":
                    self.tb.add_scalar(k, float(v), row["it"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
