"""What a run writes for people to read: sample grids (PNG) and samples (npz); evaluation
records are :mod:`vdm_jax.runner.results`'."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

# Each image of a sample grid is scaled up (nearest neighbour) to at least this many pixels.
MIN_TILE_PIXELS = 64
# Grey between tiles: images are black-on-white or white-on-black, and the gap must show.
GAP_VALUE = 128


def image_grid(samples: np.ndarray, vocab_size: int, gap: int | None = None) -> np.ndarray:
    """Integer images -> one displayable uint8 grid [rows h, cols w, C], about square.

    Values are scaled by 255 / (K - 1) so that the largest value is white; each image is
    scaled up by an integer factor to at least :data:`MIN_TILE_PIXELS` pixels (an 8x8 digit
    becomes 64x64), and tiles are separated (and framed) by grey gaps.

    Args:
      samples: [N, H, W, C] integers in {0..K-1}, C = 1 or 3.
      vocab_size: K.
      gap: grey pixels between tiles; default an eighth of a tile, at least 2.
    """
    n, height, width, channels = samples.shape
    scale = max(1, math.ceil(MIN_TILE_PIXELS / min(height, width)))
    tile_h, tile_w = height * scale, width * scale
    gap = max(2, tile_h // 8) if gap is None else gap
    pixels = np.round(samples.astype(np.float64) * (255.0 / (vocab_size - 1))).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full(
        (rows * (tile_h + gap) + gap, cols * (tile_w + gap) + gap, channels), GAP_VALUE, np.uint8
    )
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = gap + r * (tile_h + gap), gap + c * (tile_w + gap)
        grid[top : top + tile_h, left : left + tile_w] = pixels[i]
    return grid


def write_samples(samples: np.ndarray, vocab_size: int, workdir: str, step: int) -> str:
    """Writes ``{workdir}/samples/step_{step}.png`` (a grid) and ``.npz`` (``samples``, int).

    Returns:
      The PNG's path.
    """
    directory = os.path.join(workdir, "samples")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{step}")
    grid = image_grid(samples, vocab_size)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path + ".png")
    np.savez(path + ".npz", samples=samples.astype(np.int32))
    return path + ".png"
