"""Fixed 2-D sin-cos position embeddings, as MAE's util/pos_embed.py (docs/methods.md 0.2).

Layout of one token's D-vector: the FIRST D/2 dims encode its column (w) index and the LAST D/2
its row (h) index, because MAE builds `np.meshgrid(grid_w, grid_h)` ("w goes first"). Each half is
`[sin(pos * omega_k)]_{k<D/4} ++ [cos(pos * omega_k)]_{k<D/4}`, `omega_k = 10000^(-k/(D/4))`.
Computed in float64 (MAE's `np.float` is gone from NumPy >= 1.24).
"""
import numpy as np


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Return [grid_size**2, D] float64, or [1 + grid_size**2, D] with a zero cls row first.

    Token j sits at row j // grid_size, column j % grid_size (row-major, as patchify).
    """
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first (MAE); grid[0] is the column index
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """grid: [2, 1, H, W] (column indices, row indices) -> [H*W, D]; D must be divisible by 4."""
    assert embed_dim % 4 == 0, f"2-D sin-cos needs embed_dim % 4 == 0, got {embed_dim}"
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2) columns
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2) rows
    return np.concatenate([emb_w, emb_h], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: positions of any shape, flattened to M -> [M, D] = sin half ++ cos half."""
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega = 1.0 / 10000 ** (omega / (embed_dim / 2.0))  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2) outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
