"""The shapes an engine takes: batch, height and width from a smallest through an optimal to a
largest. torch.export bounds its dynamic dimensions by it, TensorRT builds one optimisation
profile from it, and every backend checks a batch against it before running (`reason`, `chunks`).
Height and width are multiples of 8 (the network's three 2x down-samplings), at least 16."""

from __future__ import annotations

import dataclasses

MULTIPLE = 8
MIN_SIDE = 16

Shape = tuple[int, int, int]  # batch, height, width


def parse_shape(text: str) -> Shape:
    """'4x512x512' -> (4, 512, 512)."""
    parts = text.lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"a shape is BATCHxHEIGHTxWIDTH, like 4x512x512; got {text!r}")
    return shape


def show(shape: Shape) -> str:
    return "x".join(map(str, shape))


@dataclasses.dataclass(frozen=True)
class ShapeProfile:
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self):
        for name in ("min", "opt", "max"):
            b, h, w = getattr(self, name)
            if b < 1:
                raise ValueError(f"{name} shape {show(getattr(self, name))}: the batch must be >= 1")
            if h % MULTIPLE or w % MULTIPLE or min(h, w) < MIN_SIDE:
                raise ValueError(f"{name} shape {show(getattr(self, name))}: height and width must be multiples "
                                 f"of {MULTIPLE} and at least {MIN_SIDE}")
        if not all(lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"shape profile needs min <= opt <= max in each dimension, got min {show(self.min)}, "
                             f"opt {show(self.opt)}, max {show(self.max)}")

    def reason(self, height: int, width: int) -> str | None:
        """Why slices of this size cannot run in the profile (None: they can). Any batch can:
        backends cut it into chunks no larger than the largest and pad each up to the smallest."""
        (_, h0, w0), (_, h1, w1) = self.min, self.max
        if not (h0 <= height <= h1 and w0 <= width <= w1):
            return (f"slices of {height}x{width} are outside the engine's profile (height {h0} to {h1}, "
                    f"width {w0} to {w1})")
        return None

    def chunks(self, batch: int) -> list[slice]:
        """The batch cut into runs of at most the profile's largest batch."""
        return [slice(i, i + self.max[0]) for i in range(0, batch, self.max[0])]

    def example_input(self):
        """A random `[B, 1, H, W]` input inside the profile to trace with: batch 2 where the
        batch can vary (torch.export specialises a dimension traced at size 1), sides near 64."""
        import torch

        def clamp(value: int, i: int) -> int:
            return min(max(value, self.min[i]), self.max[i])

        return torch.rand(clamp(2, 0), 1, clamp(64, 1), clamp(64, 2))

    def dynamic_dims(self) -> dict:
        """torch.export's dynamic dimensions of the input: each that can vary, bounded by the
        profile (height and width as 8 x an integer); one that cannot is left out (static)."""
        import torch

        (b0, h0, w0), (b1, h1, w1) = self.min, self.max
        dims = {}
        if b1 > b0:
            dims[0] = torch.export.Dim("batch", min=b0, max=b1)
        if h1 > h0:
            dims[2] = MULTIPLE * torch.export.Dim("h8", min=h0 // MULTIPLE, max=h1 // MULTIPLE)
        if w1 > w0:
            dims[3] = MULTIPLE * torch.export.Dim("w8", min=w0 // MULTIPLE, max=w1 // MULTIPLE)
        return dims

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeProfile":
        return cls(*(tuple(d[k]) for k in ("min", "opt", "max")))


# What an engine takes unless told: ONNX and AOTInductor bound their dynamic dimensions loosely;
# TensorRT sizes its memory and tactics for the largest shape, so its profile is tighter.
DEFAULT_PROFILE = ShapeProfile((1, 16, 16), (4, 512, 512), (64, 4096, 4096))
TENSORRT_PROFILE = ShapeProfile((1, 16, 16), (4, 512, 512), (16, 1024, 1024))
