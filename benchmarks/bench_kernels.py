"""Per-kernel timing on one GPU against the PyTorch ops they replace, at the shapes of the
default AMIR model on a 512x512 slice (bf16), with achieved bandwidth (bytes each kernel
must move at least, over its time) and the device's measured copy bandwidth as the ceiling.

    python benchmarks/bench_kernels.py [--json $OUT/kernels.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from medir_fast.backends.triton import pack_experts
from medir_fast.kernels.channel_routing import channel_routing
from medir_fast.kernels.dwconv import dwconv3x3
from medir_fast.kernels.gdfn import gdfn_gate
from medir_fast.kernels.layernorm import add_layernorm
from medir_fast.kernels.mdta import mdta_attention
from medir_fast.kernels.spatial_routing import spatial_routing
from medir_fast.kernels.spatial_routing_grouped import spatial_routing_grouped
from medir_fast.model.amir import PROMPT_DIM, Attention, ChannelRouting, LayerNorm, SpatialRouting

DT = torch.bfloat16
DEV = "cuda"


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (bytes read + written): the memory ceiling."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def cases(sides=(512, 128)):
    """(name, kernel fn, torch fn, minimum bytes moved) at 512x512: level 1 (C=42), level 3 (C=168)."""
    for c, heads, side in [(42, 1, sides[0]), (168, 4, sides[1])]:
        hw, e = side * side, DT.itemsize
        x = torch.randn(1, c, side, side, device=DEV, dtype=DT)
        norm = LayerNorm(c, "WithBias").to(DEV).eval()
        # As the backend uses it: float32 residual stream + bf16 branch -> float32 sum, bf16 norm.
        x32 = x.float()
        yield (f"add+layernorm C={c} {side}^2",
               lambda: add_layernorm(x32, x, norm.body.weight, norm.body.bias, out_dtype=DT),
               lambda: norm(x32 + x).to(DT), (4 + 2 + 4 + 2) * c * hw)
        hidden = int(c * 2.66)
        y = torch.randn(1, 2 * hidden, side, side, device=DEV, dtype=DT)
        wd = torch.randn(2 * hidden, 1, 3, 3, device=DEV, dtype=DT)

        def gdfn_torch():
            a, b = F.conv2d(y, wd, padding=1, groups=2 * hidden).chunk(2, 1)
            return F.gelu(a) * b
        yield (f"gdfn gate C={c}", lambda: gdfn_gate(y, wd), gdfn_torch, 3 * hidden * hw * e)
        attn = Attention(c, heads, False).to(DEV).eval()
        qkv = torch.randn(1, 3 * c, side, side, device=DEV, dtype=DT)
        wq = attn.qkv_dwconv.weight.to(DT)
        yield (f"qkv dwconv C={c}", lambda: dwconv3x3(qkv, wq),
               lambda: F.conv2d(qkv, wq, padding=1, groups=3 * c), 2 * 3 * c * hw * e)

        def mdta_torch():
            q, k, v = (t.reshape(1, heads, c // heads, hw) for t in qkv.chunk(3, 1))
            s = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * attn.temperature
            return (s.softmax(-1).to(DT) @ v).reshape(1, c, side, side)
        yield (f"mdta attention C={c}", lambda: mdta_attention(qkv, attn.temperature, heads), mdta_torch,
               4 * c * hw * e)
        route = ChannelRouting(c).to(DEV).eval()
        prompt = torch.randn(1, PROMPT_DIM, device=DEV)
        logits = route.fc(prompt)
        yield (f"channel routing+norm C={c}",
               lambda: channel_routing(x, logits, route.gamma, route.beta, norm.body.weight, norm.body.bias),
               lambda: norm(route(x, prompt)), 3 * c * hw * e)
        sr = SpatialRouting(c, 2.66).to(DEV).eval()
        with torch.no_grad():
            sr.moe.w_gate.normal_(0, 0.1)
        kw = dict(gate_bias=(sr.fc(prompt) @ sr.moe.w_gate[c:]).float().contiguous(), **pack_experts(sr, DT))
        yield (f"spatial routing C={c}", lambda: spatial_routing(x, **kw),
               lambda: sr(x.float(), prompt)[0], 2 * c * hw * e)
        # The other design (sorted by expert, grouped GEMM); the faster one stays in the backend.
        yield (f"spatial routing grouped C={c}", lambda: spatial_routing_grouped(x, **kw),
               lambda: sr(x.float(), prompt)[0], 2 * c * hw * e)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; nothing measured")
        return 2
    ceiling = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {ceiling:.0f} GB/s")
    print(f"{'kernel':<28} {'triton us':>10} {'torch us':>10} {'speed-up':>9} {'GB/s':>8} {'of ceiling':>10}")
    rows = []
    with torch.inference_mode():
        for name, kernel, reference, nbytes in cases():
            k_ms, t_ms = do_bench(kernel), do_bench(reference)
            gbs = nbytes / k_ms / 1e6
            rows.append(dict(kernel=name, triton_us=k_ms * 1e3, torch_us=t_ms * 1e3, gb_per_s=gbs,
                             fraction_of_copy_bandwidth=gbs / ceiling))
            print(f"{name:<28} {k_ms * 1e3:10.1f} {t_ms * 1e3:10.1f} {t_ms / k_ms:9.2f} {gbs:8.0f} "
                  f"{gbs / ceiling:10.0%}")
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), copy_gb_per_s=ceiling, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
