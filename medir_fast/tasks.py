"""Task presets: the official intensity ranges, display windows and the `mri_sr` grid rule.

The network sees intensities clipped to the task's range and scaled to [0, 1]; its output is
mapped back with the inverse, so users read and write physical units (HU, SUV, MRI intensity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    name: str
    modality: str
    lo: float  # intensity range fed to the network: clip to [lo, hi], scale to [0, 1]
    hi: float
    window: tuple[float, float]  # display (and evaluation) window
    unit: str
    description: str

    def normalize(self, x: np.ndarray | "torch.Tensor"):
        """Physical units -> network input in [0, 1] (float32)."""
        scaled = (x - self.lo) / (self.hi - self.lo)
        return scaled.clip(0.0, 1.0) if isinstance(scaled, np.ndarray) else scaled.clamp(0.0, 1.0)

    def denormalize(self, y):
        """Network output -> physical units (not clipped: the network may step outside [0, 1])."""
        return y * (self.hi - self.lo) + self.lo

    def with_range(self, lo: float, hi: float) -> "Task":
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"intensity range must be finite with LO < HI, got [{lo}, {hi}]")
        return Task(self.name, self.modality, float(lo), float(hi), self.window, self.unit, self.description)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("ct_denoise", "CT", -1024.0, 3071.0, (-160.0, 240.0), "HU", "low-dose CT denoising"),
        Task("mri_sr", "MRI", 0.0, 4095.0, (0.0, 4095.0), "a.u.", "MRI super-resolution (x2 or x4)"),
        Task("pet_synthesis", "PET", 0.0, 20.0, (0.0, 20.0), "SUV", "low-dose to standard-dose PET synthesis"),
    )
}

MRI_SR_SCALES = (2, 4)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None
