"""What each row of `medir-fast bench` runs: a callable from a batch [B, 1, H, W] in [0, 1] on the
device to its output, built once per backend and precision (the build is timed as `setup_s`).

Baselines: `official` (the official algorithm, `official.py`, under autocast for fp16/bf16 as a
PyTorch user would run it), `compile` (the same under `torch.compile`) and `bm3d` (BM3D per
slice, on the CPU in float64: what `ct_denoise` and `pet_synthesis` users run without a network).
Then every medir-fast backend of `medir_fast.backends.BACKENDS` (`eager` is also a baseline:
the network in plain PyTorch). With a tile, a network row runs the `Restorer`'s tiles, as
`medir-fast infer --tile` does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..backends import BACKENDS, BackendUnavailable, make_backend, unavailable_reason
from ..backends.eager import EagerBackend
from ..restorer import PRECISIONS, Restorer, precision_name
from .official import official_model

NETWORK_BASELINES = ("official", "compile")
CLASSICAL = {"bm3d": ("ct_denoise", "pet_synthesis")}  # classical baseline -> the tasks it serves
ALL = (*NETWORK_BASELINES, *BACKENDS, *CLASSICAL)
BASELINES = (*NETWORK_BASELINES, "eager", *CLASSICAL)  # every row's speed-up is given against these
Call = Callable[[torch.Tensor], torch.Tensor]


def skip_reason(name: str, model: torch.nn.Module, device: torch.device, precision: str, task: str) -> str | None:
    """Why row `name` cannot run here (None: it can try), found without building anything."""
    if name in CLASSICAL:
        if task not in CLASSICAL[name]:
            return f"a baseline for {', '.join(CLASSICAL[name])}, not {task}"
        try:
            import bm3d  # noqa: F401
            import skimage  # noqa: F401
        except ImportError as exc:
            return f"{exc.name} is not installed (pip install 'medir-fast[bench]')"
        return None
    if name in NETWORK_BASELINES:
        return None
    return unavailable_reason(name, device, PRECISIONS[precision], model)


class OfficialBackend(EagerBackend):
    """The official algorithm in eager PyTorch, under autocast for fp16/bf16."""

    name = "official"


class CompiledOfficialBackend(EagerBackend):
    """The official algorithm under `torch.compile` (compiled on its first call at each shape)."""

    name = "compile"


def build(name: str, model: torch.nn.Module, device: torch.device, precision: str, tile: int, task: str,
          batch: int) -> tuple[Call, object]:
    """(the row's callable, the backend object behind it or None)."""
    if name in CLASSICAL:
        return bm3d_call, None
    dtype = PRECISIONS[precision]
    if name == "official":
        backend = OfficialBackend(official_model(model).to(device), device, dtype)
    elif name == "compile":
        backend = CompiledOfficialBackend(torch.compile(official_model(model).to(device)), device, dtype)
    else:
        backend = make_backend(name, model, device, dtype)
    if not tile:
        return backend.run, backend
    restorer = Restorer(model, task, backend=backend, device=device, precision=precision_name(dtype),
                        batch_size=batch, tile=tile)

    def tiled(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(restorer.restore_normalized(x[:, 0].cpu().numpy()))[:, None]
    return tiled, backend


def bm3d_call(x: torch.Tensor) -> torch.Tensor:
    """BM3D on each slice, its noise level estimated from the slice (scikit-image's wavelet
    estimate), as a user without a noise model runs it."""
    import bm3d
    from skimage.restoration import estimate_sigma

    slices = x[:, 0].double().cpu().numpy()
    out = [bm3d.bm3d(s, sigma_psd=max(float(estimate_sigma(s)), 1e-3)) for s in slices]
    return torch.from_numpy(np.stack(out)).float()[:, None]


def unavailable(exc: BaseException) -> bool:
    """A build error that means 'cannot run here' (a skip) rather than a failure."""
    return isinstance(exc, (BackendUnavailable, ImportError))
