"""The weights shipped inside the package, listed in `manifest.json` and checked by sha256.

The manifest maps a name to its file, AMIR config, checksum, training record, held-out
metrics and, optionally, the tile size per task chosen for those weights on validation
slices (`"tile"`); `"default"` names the model `load()` returns when no name is given. An empty
`"models"` table means no weights are shipped yet.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path

import torch

from ..errors import first_line

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"


class WeightsError(ValueError):
    """Shipped weights that are missing, unknown or fail their checksum."""


def manifest() -> dict:
    """The parsed manifest (`{"default": name | None, "models": {name: entry}}`), read once per
    version of the file."""
    if not MANIFEST.is_file():
        return {"default": None, "models": {}}
    stat = MANIFEST.stat()
    return copy.deepcopy(_parse(MANIFEST, stat.st_mtime_ns, stat.st_size))  # callers may edit theirs


@functools.lru_cache(maxsize=4)
def _parse(path: Path, mtime_ns: int, size: int) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"shipped weights manifest {path} is not valid JSON: {exc}") from None
    data.setdefault("default", None)
    data.setdefault("models", {})
    return data


def available() -> list[str]:
    """Names of the shipped models, the default first."""
    data = manifest()
    names = sorted(data["models"])
    if data["default"] in names:
        names.remove(data["default"])
        names.insert(0, data["default"])
    return names


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, AMIR config) of a shipped model, after checking its sha256."""
    data = manifest()
    if not data["models"]:
        raise WeightsError("no default weights are shipped with this medir-fast; pass a checkpoint file")
    name = name or data["default"]
    if name not in data["models"]:
        raise WeightsError(f"unknown shipped weights {name!r}; available: {', '.join(available())}")
    entry = data["models"][name]
    path = HERE / entry["file"]
    if not path.is_file():
        raise WeightsError(f"shipped weights {name!r} are missing their file {path}")
    actual = sha256(path)
    if actual != entry["sha256"]:
        raise WeightsError(
            f"shipped weights {path} fail their checksum (sha256 {actual[:12]}..., expected "
            f"{entry['sha256'][:12]}...): the file is corrupted or was modified; reinstall medir-fast"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the checksum passed, so this is a manifest/file mismatch
        raise WeightsError(f"cannot read shipped weights {path}: {first_line(exc)}") from exc
    return state_dict, dict(entry["config"])


def shipped_name(weights) -> str | None:
    """The shipped model that a weights argument names: None and "default" name the default;
    any other string names the model of that name. None for anything else (a checkpoint path)."""
    data = manifest()
    if weights is None or weights == "default":
        return data["default"]
    if isinstance(weights, str) and weights in data["models"]:
        return weights
    return None


def tiles(name: str | None) -> dict[str, int]:
    """{task: tile side} a shipped model was validated at (absent tasks: whole slices).

    Models trained on small crops see statistics over a crop in their global operations (the
    task prompt's mean, the transposed attention); restoring in tiles of about that size keeps
    inference like training.
    """
    entry = manifest()["models"].get(name) if name else None
    return dict(entry.get("tile", {})) if entry else {}
