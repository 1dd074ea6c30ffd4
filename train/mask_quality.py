"""How the masks a run trains on behave, per epoch, so a user sees whether the teacher's masks
still find objects as the teacher changes:

    mask_recall         share of foreground patches masked (where the data knows its foreground,
                        as the sample set does; random masks: the ratio), from FG_ROWS images a batch
    mask_entropy        mean binary entropy (bits) of each patch position's masking frequency over
                        the epoch: 0.81 for uniform random masks at 0.75, lower when some
                        positions are (almost) always or never masked
    mask_overlap_prev   IoU of an image's masked patches with its masked patches one epoch earlier
                        (crops change every epoch, so random masks give about ratio / (2 - ratio));
                        over the images this rank saw in both epochs
    mask_ratio_hist     per-image mask ratios in RATIO_BINS (AMR's adaptive ratio)

Pure numpy over CPU masks: the trainer feeds it a batch's mask and sample ids.
"""
from __future__ import annotations

import json

import numpy as np

RATIO_BINS = np.linspace(0.0, 1.0, 21)
FG_ROWS = 8   # images a batch whose foreground is read for the recall


class MaskQuality:
    def __init__(self, n_samples: int, num_patches: int):
        self.L = num_patches
        self.prev = np.zeros((n_samples, (num_patches + 7) // 8), np.uint8)
        self.cur = np.zeros_like(self.prev)
        self.seen_prev = np.zeros(n_samples, bool)
        self.seen_cur = np.zeros(n_samples, bool)
        self._reset()

    def _reset(self) -> None:
        self.freq = np.zeros(self.L, np.int64)
        self.images = 0
        self.hit = self.fg = 0
        self.iou_sum, self.iou_n = 0.0, 0
        self.ratios = np.zeros(len(RATIO_BINS) - 1, np.int64)

    def add(self, mask: np.ndarray, ids: np.ndarray, valid: np.ndarray, fg: np.ndarray | None = None,
            fg_rows: np.ndarray | None = None) -> None:
        """mask [B, L] bool (True = masked), ids [B], valid [B] bool; fg [K, L] bool: the
        foreground of rows fg_rows (valid rows of the batch), or None."""
        if fg is not None:
            self.hit += int((mask[fg_rows] & fg).sum())
            self.fg += int(fg.sum())
        mask, ids = mask[valid], ids[valid]
        self.freq += mask.sum(0)
        self.images += len(mask)
        self.ratios += np.histogram(mask.mean(1), RATIO_BINS)[0]
        again = self.seen_prev[ids]
        if again.any():
            before = np.unpackbits(self.prev[ids[again]], axis=1, count=self.L).astype(bool)
            now = mask[again]
            union = (before | now).sum(1)
            self.iou_sum += float(((before & now).sum(1) / np.maximum(union, 1)).sum())
            self.iou_n += int(again.sum())
        self.cur[ids] = np.packbits(mask, axis=1)
        self.seen_cur[ids] = True

    def epoch_end(self) -> dict:
        """The epoch's figures (None where nothing was measured); the epoch's masks become `prev`."""
        p = self.freq / max(self.images, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        out = {"mask_recall": self.hit / self.fg if self.fg else None,
               "mask_entropy": float(np.nan_to_num(h).mean()) if self.images else None,
               "mask_overlap_prev": self.iou_sum / self.iou_n if self.iou_n else None,
               "mask_ratio_hist": self.ratios.tolist()}
        self.prev, self.cur = self.cur, self.prev
        self.seen_prev, self.seen_cur = self.seen_cur, np.zeros_like(self.seen_cur)
        self._reset()
        return out


def foreground(reader, plan, batch, img_size: int, patch: int, rows: int = FG_ROWS):
    """-> (fg [K, L] bool, row indices [K]) of the batch's first K valid images in their first view,
    where their KEY.json has a foreground (the sample set's `fg`), else None. K images a batch
    estimate the epoch's recall at a fraction of the cost (each costs a JSON read and a resize)."""
    from mimpipe.tools.sample import fg_patches
    idx = np.flatnonzero(batch.valid.numpy())[:rows]
    if not len(idx):   # a rank's last batch can be all padding
        return np.zeros((0, (img_size // patch) ** 2), bool), idx
    ids = batch.sample_ids.numpy()[idx]
    metas = [json.loads(reader.read_one(int(i), meta=True).tobytes()) for i in ids]
    if not all("fg" in m for m in metas):
        return None
    view = plan.views(batch.epoch, ids)[0]   # of the ids as delivered (a replaced bad sample too)
    return np.stack([fg_patches(m, view.crop[j], bool(view.flip[j]), img_size, patch)
                     for j, m in enumerate(metas)]), idx
