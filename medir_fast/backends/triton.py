"""The Triton backend: AMIR's forward walked module by module, the fused kernels of
`medir_fast.kernels` for LayerNorm, the GDFN middle, MDTA, spatial and channel routing, and
torch (cuDNN) for the dense 1x1/3x3 convolutions. Convolutions, attention and experts run in
the chosen dtype; the residual stream (what the blocks add to), the prompt network and the
first and last convolutions stay float32, as they do in the reference under autocast.

On CUDA each input shape is captured once in a CUDA graph and replayed. On the CPU it runs
only under Triton's interpreter (TRITON_INTERPRET=1 before the kernels are imported): slow,
for tests. It never runs anything else under its name. Importing this module needs Triton
(the backend registry reports an ImportError as the reason it is unavailable).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from medir_fast.backends import BackendUnavailable
from medir_fast.kernels._common import INTERPRET
from medir_fast.kernels.channel_routing import channel_routing
from medir_fast.kernels.dwconv import dwconv3x3
from medir_fast.kernels.gdfn import gdfn_gate
from medir_fast.kernels.layernorm import add_layernorm, layernorm_channels
from medir_fast.kernels.mdta import mdta_attention
from medir_fast.kernels.spatial_routing import spatial_routing
from medir_fast.model.amir import AMIR, BiasFreeLayerNorm, ChannelRouting, LayerNorm, SpatialRouting, TransformerBlock

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    device = torch.device(device)
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (float32, bfloat16, float16)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA was requested but no CUDA device is available"
    if device.type == "cpu":
        # Both: the interpreter asked for now, and the kernels built for it when imported.
        if os.environ.get("TRITON_INTERPRET") == "1" and INTERPRET:
            return None
        why = ("TRITON_INTERPRET=1 was set after the kernels were imported"
               if os.environ.get("TRITON_INTERPRET") == "1" else "TRITON_INTERPRET=1 is not set")
        return (f"the triton backend needs a CUDA GPU; on the CPU it runs only under Triton's "
                f"interpreter, for testing ({why})")
    return f"device type {device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"


def pack_experts(route: SpatialRouting, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A spatial routing block's weights as the routing kernels take them: the gate's pixel half
    [C, 4] float32, the experts' layers stacked [4, ...], weights in `dtype`, biases float32.
    (The gate's prompt half enters per image as `gate_bias`.)"""
    c = route.fc.out_features
    stack = lambda get, dt: torch.stack([get(e).detach() for e in route.moe.experts]).to(dt).contiguous()
    return dict(
        w_gate_x=route.moe.w_gate.detach()[:c].float().contiguous(),
        w1=stack(lambda e: e.fc1.weight, dtype), b1=stack(lambda e: e.fc1.bias, torch.float32),
        w2=stack(lambda e: e.fc2.weight, dtype), b2=stack(lambda e: e.fc2.bias, torch.float32),
    )


class TritonBackend:
    name = "triton"

    def __init__(self, model: AMIR, device: torch.device, dtype: torch.dtype):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.dtype = dtype
        self._graphs: dict[tuple, tuple] = {}
        # Weights in the activation dtype, prepared once (the modules keep their float32 ones).
        self._conv = {m: (m.weight.detach().to(dtype), None if m.bias is None else m.bias.detach().to(dtype))
                      for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
        self._experts = {m: pack_experts(m, dtype) for m in model.modules() if isinstance(m, SpatialRouting)}

    # ------------------------------------------------------------------ running

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, torch.float32).contiguous()
        if self.device.type != "cuda":
            return self.forward(batch)
        key = tuple(batch.shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(batch)
        graph.replay()
        return static_out.clone()

    def _capture(self, batch: torch.Tensor) -> tuple:
        """One warm-up run on a side stream (compiles the kernels), then a CUDA graph capture."""
        static_in = batch.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.forward(static_in)
        return graph, static_in, static_out

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        """AMIR.forward (eval) for a float32 batch, through the kernels; float32 out."""
        if self.dtype != torch.float32 or self.device.type != "cuda":
            return self._forward(inp)
        cudnn = torch.backends.cudnn
        # float32 means float32: cuDNN would otherwise run the convolutions in TF32.
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                         deterministic=cudnn.deterministic, allow_tf32=False):
            return self._forward(inp)

    def _forward(self, inp: torch.Tensor) -> torch.Tensor:
        m = self.model
        prompt = m.dict_generator(inp)
        x = m.patch_embed(inp)

        x = self._spatial(m.spatial_routing_encoder_level1, x, prompt)
        enc1 = self._blocks(m.encoder_level1, x)
        x = self._spatial(m.spatial_routing_encoder_level2, self._resample(m.down1_2, enc1), prompt)
        enc2 = self._blocks(m.encoder_level2, x)
        x = self._spatial(m.spatial_routing_encoder_level3, self._resample(m.down2_3, enc2), prompt)
        enc3 = self._blocks(m.encoder_level3, x)
        x = self._routed_blocks(m.channel_routing_latent, m.latent, self._resample(m.down3_4, enc3), prompt)

        x = self._conv2d(m.reduce_chan_level3, torch.cat([self._resample(m.up4_3, x), enc3.to(self.dtype)], 1))
        x = self._routed_blocks(m.channel_routing_decoder_level3, m.decoder_level3, x, prompt)
        x = self._conv2d(m.reduce_chan_level2, torch.cat([self._resample(m.up3_2, x), enc2.to(self.dtype)], 1))
        x = self._routed_blocks(m.channel_routing_decoder_level2, m.decoder_level2, x, prompt)
        x = torch.cat([self._resample(m.up2_1, x), enc1.to(self.dtype)], 1)
        x = self._routed_blocks(m.channel_routing_decoder_level1, m.decoder_level1, x, prompt)

        x = self._blocks(m.refinement, x)
        return m.output(x.float()) + inp

    # ------------------------------------------------------------------ pieces

    def _conv2d(self, conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._conv[conv]
        return F.conv2d(x.to(self.dtype), weight, bias, padding=conv.padding)

    def _resample(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Downsample / Upsample: a 3x3 conv, then pixel (un)shuffle."""
        conv, shuffle = module.body
        return shuffle(self._conv2d(conv, x)).contiguous()

    def _spatial(self, route: SpatialRouting, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        c = route.fc.out_features
        gate_bias = (route.fc(prompt) @ route.moe.w_gate[c:]).float().contiguous()
        return spatial_routing(x.contiguous(), gate_bias, **self._experts[route], out_dtype=torch.float32)

    def _routed_blocks(self, route: ChannelRouting, blocks: torch.nn.Sequential, x: torch.Tensor,
                       prompt: torch.Tensor) -> torch.Tensor:
        """Channel routing fused with the first block's norm1 (when there is a first block)."""
        logits = route.fc(prompt).float().contiguous()
        if len(blocks) == 0:
            return channel_routing(x, logits, route.gamma, route.beta, out_dtype=torch.float32)
        weight, bias = _norm_params(blocks[0].norm1)
        x, normed = channel_routing(x, logits, route.gamma, route.beta, weight, bias,
                                    out_dtype=torch.float32, norm_dtype=self.dtype)
        return self._blocks(blocks, x, normed)

    def _blocks(self, blocks: torch.nn.Sequential, x: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer blocks; each residual add is fused with the LayerNorm that follows it."""
        branch = None  # the previous block's feed-forward output, not yet added to x
        for block in blocks:
            if branch is not None:
                x, normed = add_layernorm(x, branch, *_norm_params(block.norm1), out_dtype=self.dtype)
            elif normed is None:
                normed = layernorm_channels(x, *_norm_params(block.norm1), out_dtype=self.dtype)
            x, branch = self._block(block, x, normed)
            normed = None
        return x if branch is None else x + branch

    def _block(self, block: TransformerBlock, x: torch.Tensor,
               normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x + attn(normed), then the feed-forward branch, left for the caller to add."""
        attn, ffn = block.attn, block.ffn
        qkv = dwconv3x3(self._conv2d(attn.qkv, normed), *self._conv[attn.qkv_dwconv])
        attended = self._conv2d(attn.project_out, mdta_attention(qkv, attn.temperature, attn.num_heads))
        x, normed = add_layernorm(x, attended, *_norm_params(block.norm2), out_dtype=self.dtype)
        hidden = self._conv2d(ffn.project_in, normed)
        return x, self._conv2d(ffn.project_out, gdfn_gate(hidden, *self._conv[ffn.dwconv]))


def _norm_params(norm: LayerNorm) -> tuple[torch.Tensor, torch.Tensor | None]:
    body = norm.body
    return body.weight, None if isinstance(body, BiasFreeLayerNorm) else body.bias


def make(model: AMIR, device: torch.device, dtype: torch.dtype) -> TritonBackend:
    reason = unavailable_reason(device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"backend 'triton' unavailable: {reason}")
    return TritonBackend(model, torch.device(device), dtype)
