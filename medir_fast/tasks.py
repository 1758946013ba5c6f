"""THE task table: every other place (CLI choices, evaluation windows, modality folders, MRI
scales, tiles) reads it.

The network sees intensities clipped to the task's range and scaled to [0, 1]; its output is
mapped back with the inverse, so users read and write physical units (HU, SUV, MRI intensity).
The window is where images are shown and scored (the official test script clips CT to it).
"""

from __future__ import annotations

import dataclasses
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
    scales: tuple[int, ...] = ()  # in-plane upsampling factors the task takes (mri_sr: --scale)
    dicom_modality: str = ""  # DICOM's Modality (0008,0060) of the series the task restores

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
        return dataclasses.replace(self, lo=float(lo), hi=float(hi))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("ct_denoise", "CT", -1024.0, 3071.0, (-160.0, 240.0), "HU", "low-dose CT denoising", dicom_modality="CT"),
        Task("mri_sr", "MRI", 0.0, 4095.0, (0.0, 4095.0), "a.u.", "MRI super-resolution (x2 or x4)", scales=(2, 4),
             dicom_modality="MR"),
        Task("pet_synthesis", "PET", 0.0, 20.0, (0.0, 20.0), "SUV", "low-dose to standard-dose PET synthesis",
             dicom_modality="PT"),
    )
}

MODALITIES = tuple(t.modality for t in TASKS.values())  # the paired-data folders: ROOT/{CT,MRI,PET}/...
SCALES = tuple(sorted({s for t in TASKS.values() for s in t.scales}))


def get_task(name: str) -> Task:
    """A task by its name (`ct_denoise`) or its modality (`CT`)."""
    for task in TASKS.values():
        if name in (task.name, task.modality):
            return task
    raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)} (or {', '.join(MODALITIES)})")


def per_modality(spec: str, modalities: tuple[str, ...], error: ValueError) -> dict[str, int]:
    """"CT=64,MRI=128,PET=64" (keys: modalities or task names) -> {modality: int}, naming exactly
    `modalities` (the workbench's per-modality options: crops, batch shares, tiles)."""
    try:
        values = {}
        for key, value in (part.split("=") for part in spec.split(",")):
            key = key.strip()
            modality = get_task(key if key in TASKS else key.upper()).modality
            if modality in values:
                raise ValueError(f"{modality} given twice")
            values[modality] = int(value)
    except ValueError:
        raise error from None
    if set(values) != set(modalities):
        raise error
    return values
