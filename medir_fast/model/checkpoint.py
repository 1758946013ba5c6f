"""Loading AMIR checkpoints: official `Generator_best.pth` state dicts and common wrappings.

Everything goes through `torch.load(..., weights_only=True)`: a checkpoint is data, never code.
Before that, the file's integrity is checked: a flipped bit in a tensor would otherwise load and
run silently, restoring every scan slightly wrong.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import torch

from ..errors import first_line
from ..weights import sha256
from .amir import AMIR

log = logging.getLogger("medir_fast")

DEFAULT_CONFIG = dict(
    inp_channels=1,
    out_channels=1,
    dim=42,
    num_blocks=[5, 7, 7, 9],
    num_refinement_blocks=4,
    heads=[1, 2, 4, 8],
    ffn_expansion_factor=2.66,
    bias=False,
    LayerNorm_type="WithBias",
)


DEPTH = ("num_blocks", "num_refinement_blocks")  # the settings `deepen` may raise


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and unwrap it to a plain AMIR state dict.

    Accepts a plain state dict, one wrapped in `{'state_dict': ...}` or `{'model': ...}`,
    and keys prefixed `module.` (DataParallel / DistributedDataParallel).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    check_integrity(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; report them all as one
        raise CheckpointError(f"cannot read weights {path}: {first_line(exc)}") from exc
    return unwrap_state_dict(obj, str(path))


def check_integrity(path: Path) -> None:
    """Refuse a damaged checkpoint before it is unpickled.

    PyTorch checkpoints (since 1.6) are zip archives holding a CRC-32 per record: every record
    is read back and checked. A `NAME.sha256` file beside the weights (as `sha256sum` writes it)
    is verified when present. Legacy (non-zip) checkpoints carry no checksums; they load with a
    warning unless a `.sha256` file vouches for them.
    """
    sidecar = path.with_name(path.name + ".sha256")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"weights {path} are a damaged archive (truncated?): {exc}") from exc
        if bad is not None:
            raise CheckpointError(f"weights {path} are corrupted: record {bad!r} fails its CRC-32 check")
    elif not sidecar.is_file():
        log.warning("weights %s are in the legacy (non-zip) format, which has no checksums: not integrity-checked", path)
    if sidecar.is_file():
        expected = (sidecar.read_text(errors="replace").split() or [""])[0].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise CheckpointError(f"{sidecar} does not hold a sha256 checksum")
        actual = sha256(path)
        if actual != expected:
            raise CheckpointError(f"weights {path} fail the checksum in {sidecar.name} (sha256 {actual[:12]}..., "
                                  f"expected {expected[:12]}...)")


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} is not a state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of the AMIR that owns `state_dict`, read off its shapes.

    Everything is determined by the shapes except the number of heads per level, which
    the temperature tensors give, and `ffn_expansion_factor`, which only the hidden width
    int(dim * factor) pins down: the factor is recovered as the default 2.66 when it fits,
    otherwise as hidden/dim.
    """
    try:
        dim, inp = state_dict["patch_embed.proj.weight"].shape[:2]
        out = state_dict["output.weight"].shape[0]

        def count(prefix: str) -> int:
            pattern = re.compile(rf"^{prefix}\.(\d+)\.")
            return len({m.group(1) for k in state_dict if (m := pattern.match(k))})

        num_blocks = [count(f"encoder_level{i}") for i in (1, 2, 3)] + [count("latent")]
        heads = [state_dict[f"{name}.0.attn.temperature"].shape[0]
                 for name in ("encoder_level1", "encoder_level2", "encoder_level3", "latent")]
        hidden = state_dict["encoder_level1.0.ffn.project_out.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointError(f"not an AMIR checkpoint: missing {exc.args[0]!r}") from exc
    ffn = 2.66 if int(dim * 2.66) == hidden else hidden / dim
    return dict(
        inp_channels=int(inp),
        out_channels=int(out),
        dim=int(dim),
        num_blocks=num_blocks,
        num_refinement_blocks=count("refinement"),
        heads=heads,
        ffn_expansion_factor=ffn,
        bias="output.bias" in state_dict,
        LayerNorm_type="WithBias" if "encoder_level1.0.norm1.body.bias" in state_dict else "BiasFree",
    )


def check_fits(model: AMIR, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a CheckpointError naming the first mismatching keys or shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} with wrong shape (first: {'; '.join(wrong[:3])}; checkpoint vs model)")
    if problems:
        raise CheckpointError(f"{source} does not fit the AMIR config: " + "; ".join(problems))


def build_model(state_dict: dict[str, torch.Tensor], config: dict | None = None, source: str = "checkpoint") -> AMIR:
    """An eval-mode AMIR holding `state_dict`; the config is inferred when not given."""
    config = dict(config) if config is not None else infer_config(state_dict)
    model = AMIR(**config)
    check_fits(model, state_dict, source)
    model.load_state_dict(state_dict)
    return model.eval()


def deepen(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Weights of the deeper AMIR `config` that compute exactly what `state_dict` computes.

    A network grows by appending Transformer blocks to its levels (`num_blocks`,
    `num_refinement_blocks`); every other setting must match. The appended blocks get fresh
    weights (torch's current random state) and zero output projections, so each starts as the
    identity (x + 0) and fine-tuning begins from the trained network's outputs, not from noise.
    """
    old = infer_config(state_dict)
    others = [k for k in config if k not in DEPTH and config[k] != old[k]]
    if others:
        raise CheckpointError(f"can only add blocks to a trained AMIR; these settings differ: {', '.join(others)}")
    if any(n < o for n, o in zip(config["num_blocks"], old["num_blocks"])) or (
            config["num_refinement_blocks"] < old["num_refinement_blocks"]):
        raise CheckpointError(f"cannot remove blocks: {old['num_blocks']} + {old['num_refinement_blocks']} refinement "
                              f"-> {config['num_blocks']} + {config['num_refinement_blocks']}")
    grown = AMIR(**config).state_dict()
    for key, value in grown.items():
        if key in state_dict:
            grown[key] = state_dict[key].clone()
        elif ".project_out." in key:  # attention and feed-forward outputs of an appended block
            value.zero_()
    return grown

