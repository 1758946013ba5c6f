"""A picture of the result: the middle slice's input, output and difference, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .io import Volume
from .tasks import Task

GAP = 4  # pixels between panels


def _to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def middle_slice(volume: np.ndarray, axis: int) -> np.ndarray:
    return volume if volume.ndim == 2 else np.take(volume, volume.shape[axis] // 2, axis=axis)


def write_preview(path: str | Path, volume: Volume, restored: np.ndarray, axis: int, task: Task,
                  scale: int | None = None) -> Path:
    """PNG: input | output in the task's display window, then output - input in a symmetric
    window of a quarter of the display width (mid-grey = no change). `path` is written as it is:
    `restore_file` gives a temporary that it commits together with the volume."""
    if len(volume.shape) == 2:
        before = volume.read()
    else:
        middle = volume.shape[axis] // 2
        before = volume.slab(axis, middle, middle + 1)[0]
    after = middle_slice(restored, axis)
    if scale:
        before = np.repeat(np.repeat(before, scale, axis=0), scale, axis=1)
    lo, hi = task.window
    half = (hi - lo) / 4.0
    panels = [_to_uint8(before, lo, hi), _to_uint8(after, lo, hi), _to_uint8(after - before, -half, half)]
    # Display convention: rows top to bottom, first voxel axis horizontal as radiology viewers do.
    panels = [np.flipud(p.T) for p in panels]
    h, w = panels[0].shape
    canvas = np.zeros((h, 3 * w + 2 * GAP), dtype=np.uint8)
    for i, p in enumerate(panels):
        canvas[:, i * (w + GAP): i * (w + GAP) + w] = p
    Image.fromarray(canvas).save(path, format="PNG")
    return Path(path)

