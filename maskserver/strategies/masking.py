"""The shared MAE masking path (docs/methods.md 0.4) and the wire form of masks.

Every score-based strategy (SBAM, AMR, GPA, IDM, AttMask) ends here: it builds a per-patch score and
keeps the `len_keep` lowest, exactly as MAE's `random_masking` keeps the lowest noise. This gives
exact per-image counts and MAE parity for free.

Mask convention everywhere in mimpipe: `mask: [N, L] bool, True = masked` (MAE: 1 is remove).
"""
from __future__ import annotations

import torch
from torch import Tensor

# numpy.packbits' default ("big") bit order: element 8*b + i sits in bit (7 - i) of byte b.
# Fixed here so the server and trainer (or numpy tools reading a dump) agree on the bytes.
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def len_keep_for(L: int, ratio: float) -> int:
    """MAE's `len_keep = int(L * (1 - ratio))` (Python truncation: 49 for 0.75/196, 16 for 0.75/64)."""
    return int(L * (1 - ratio))


def mask_from_scores(scores: Tensor, len_keep: int | Tensor) -> Tensor:
    """Keep the `len_keep` lowest scores of each row, mask the rest (MAE 0.4 with noise := scores).

    scores: [N, L] float. len_keep: int, or LongTensor [N] for per-image counts (AMR 'sample').
    Returns mask [N, L] bool, True = masked; row b has exactly L - len_keep[b] True entries.
    Ties are broken by patch index (stable sort: the lower index is kept), so the result is
    deterministic; with continuous noise there are no ties and this equals MAE's unstable argsort.
    """
    ids_shuffle = torch.argsort(scores, dim=1, stable=True)  # ascending: small is keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # = rank of each patch in the ascending order
    if isinstance(len_keep, Tensor):
        len_keep = len_keep.to(ids_restore.device).view(-1, 1)
    # MAE builds ones[:, K:] and un-shuffles with ids_restore; "rank >= K" is the same mask
    # without the gather, and it works for a per-image K.
    return ids_restore >= len_keep


def pack_mask(mask: Tensor) -> Tensor:
    """[N, L] bool -> [N, ceil(L/8)] uint8, numpy.packbits big-endian order, zero-padded tail."""
    N, L = mask.shape
    pad = (-L) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(N, -1, 8)
    return (bits * _BIT_WEIGHTS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(bits: Tensor, L: int) -> Tensor:
    """Inverse of `pack_mask`: [N, ceil(L/8)] uint8 -> [N, L] bool (padding bits dropped)."""
    N = bits.shape[0]
    shifts = _BIT_SHIFTS.to(bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).view(N, -1)[:, :L].bool()
