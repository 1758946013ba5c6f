"""AMIR: All-In-One Medical Image Restoration via Task-Adaptive Routing (MICCAI 2024).

A Restormer U-Net steered by a task prompt that a small network infers from the image:
the encoder routes each pixel to 2 of 4 MLP experts (spatial routing), the latent and the
decoder gate channels (channel routing). Module names and parameter shapes follow the
official implementation, so its state dicts load as they are.

Differences from the official code, all at inference and none in the function computed
(up to float rounding):
- the experts are evaluated densely and the two chosen ones gathered, instead of
  sorting pixels per expert (`nonzero`, a host sync): the forward has no data-dependent
  shapes, so `torch.export` captures it with dynamic batch, height and width;
- under autocast (fp16/bf16) the spatial routing (gating, top-k, experts, log-space
  combination), the prompt network and the first and last convolutions stay float32
  (the official code crashes there); the combination is a stable log-sum-exp (the
  official exp() overflows, or underflows to an epsilon, for large |expert output|).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_EXPERTS = 4
TOP_K = 2
PROMPT_DIM = 256
PROMPT_ATOMS = 32
PROMPT_HIDDEN = 64
NOISE_EPSILON = 1e-2


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """x as float32, or float64 if it already is (the float32 islands must not downcast a float64 model)."""
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------- backbone


class BiasFreeLayerNorm(nn.Module):
    def __init__(self, normalized_shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = x.var(-1, keepdim=True, unbiased=False)
        return x / torch.sqrt(sigma + 1e-5) * self.weight


class WithBiasLayerNorm(nn.Module):
    """(x - mean) / sqrt(var + 1e-5) * weight + bias: exactly `F.layer_norm`, one fused kernel."""

    def __init__(self, normalized_shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class LayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (Restormer's `LayerNorm`)."""

    def __init__(self, dim: int, layer_norm_type: str):
        super().__init__()
        if layer_norm_type == "BiasFree":
            self.body = BiasFreeLayerNorm(dim)
        elif layer_norm_type == "WithBias":
            self.body = WithBiasLayerNorm(dim)
        else:
            raise ValueError(f"LayerNorm_type must be 'WithBias' or 'BiasFree', not {layer_norm_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    """Gated depth-wise feed-forward network (GDFN)."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class Attention(nn.Module):
    """Multi-DConv head transposed attention (MDTA): attention across channels."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layer_norm_type: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, layer_norm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, layer_norm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """The first 3x3 convolution. The official model builds it without a bias whatever its
    `bias` option says, so a `bias=True` checkpoint has none here."""

    def __init__(self, in_c: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _blocks(n: int, dim: int, heads: int, ffn: float, bias: bool, ln: str) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, heads, ffn, bias, ln) for _ in range(n)])


# --------------------------------------------------------------------------- task prompt


class PromptGenerator(nn.Module):
    """Infers the task prompt from the image: a soft mixture of learned dictionary atoms."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.dictionary = nn.Parameter(torch.randn(PROMPT_ATOMS, PROMPT_DIM))
        self.CondNet = nn.Sequential(
            nn.Conv2d(in_channels, PROMPT_HIDDEN, 3, 3),
            nn.LeakyReLU(0.1, True),
            nn.Conv2d(PROMPT_HIDDEN, PROMPT_HIDDEN, 3, 3),
            nn.LeakyReLU(0.1, True),
            nn.Conv2d(PROMPT_HIDDEN, PROMPT_HIDDEN, 1),
            nn.LeakyReLU(0.1, True),
            nn.Conv2d(PROMPT_HIDDEN, PROMPT_HIDDEN, 1),
            nn.LeakyReLU(0.1, True),
            nn.Conv2d(PROMPT_HIDDEN, PROMPT_ATOMS, 1),
        )
        self.lastOut = nn.Linear(PROMPT_ATOMS, PROMPT_ATOMS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.CondNet(x).mean(dim=(2, 3))
        weights = self.lastOut(features).softmax(dim=1)
        return F.gelu(weights @ self.dictionary)


# --------------------------------------------------------------------------- routing


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation: the load-balancing penalty of sparse MoE."""
    if x.shape[0] == 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


class MoE(nn.Module):
    """Noisy top-k mixture of MLP experts over pixels (Shazeer et al. 2017), combined in log space."""

    def __init__(self, dim: int, hidden: int, num_experts: int = NUM_EXPERTS, k: int = TOP_K):
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.experts = nn.ModuleList([Mlp(dim, hidden) for _ in range(num_experts)])
        self.w_gate = nn.Parameter(torch.randn(2 * dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(2 * dim, num_experts))
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))

    def gating(self, gate_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 logits [N, E] -> (top-k gates [N, k], top-k indices [N, k], load-balancing loss)."""
        clean = gate_input @ self.w_gate.to(gate_input.dtype)
        if not self.training:
            top_logits, top_idx = clean.topk(self.k, dim=1)
            return top_logits.softmax(dim=1), top_idx, clean.new_zeros(())
        noise_std = F.softplus(gate_input @ self.w_noise.to(gate_input.dtype)) + NOISE_EPSILON
        noisy = clean + torch.randn_like(clean) * noise_std
        top_logits, top_idx = noisy.topk(min(self.k + 1, self.num_experts), dim=1)
        gates_k = top_logits[:, : self.k].softmax(dim=1)
        gates = torch.zeros_like(noisy).scatter(1, top_idx[:, : self.k], gates_k)
        if self.k < self.num_experts:
            load = self._prob_in_top_k(clean, noisy, noise_std, top_logits).sum(0)
        else:
            load = (gates > 0).sum(0).float()
        loss = cv_squared(gates.sum(0)) + cv_squared(load)
        return gates_k, top_idx[:, : self.k], loss

    def _prob_in_top_k(self, clean, noisy, noise_std, top_logits):
        """Differentiable probability that each expert is in the top k under fresh noise."""
        threshold_if_in = top_logits[:, self.k : self.k + 1]
        threshold_if_out = top_logits[:, self.k - 1 : self.k]
        normal = torch.distributions.Normal(self.mean.to(clean.dtype), self.std.to(clean.dtype))
        is_in = noisy > threshold_if_in
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out)

    def forward(self, x: torch.Tensor, gate_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C], gate_input [N, 2C] -> (log sum_k g_k exp(E_k(x)) [N, C], load-balancing loss)."""
        gates, idx, loss = self.gating(gate_input)
        expert_out = torch.stack([expert(x) for expert in self.experts], dim=1)  # [N, E, C]
        chosen = expert_out.gather(1, idx.unsqueeze(-1).expand(-1, -1, expert_out.shape[-1]))  # [N, k, C]
        return torch.logsumexp(chosen + gates.log().unsqueeze(-1), dim=1).to(x.dtype), loss


class SpatialRouting(nn.Module):
    """Per-pixel routing to 2 of 4 MLP experts, steered by the task prompt; residual."""

    def __init__(self, dim: int, ffn_expansion_factor: float):
        super().__init__()
        self.fc = nn.Linear(PROMPT_DIM, dim)
        self.moe = MoE(dim, int(dim * ffn_expansion_factor))

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):  # routing is float32 (see module docstring)
            x = _full_precision(x)
            pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
            # [B*H*W, C]: each image's prompt term beside each of its pixels (a broadcast, which
            # exports to ONNX at any batch size; repeat_interleave does not)
            prompt_term = self.fc(prompt.to(x.dtype))[:, None, :].expand(b, h * w, c).reshape(b * h * w, c)
            y, loss = self.moe(pixels, torch.cat([pixels, prompt_term], dim=1))
        return y.reshape(b, h, w, c).permute(0, 3, 1, 2) + x, loss


class ChannelRouting(nn.Module):
    """Per-channel gate from the task prompt: x + (x * gamma + beta) * sigmoid(fc(prompt))."""

    def __init__(self, dim: int):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.fc = nn.Linear(PROMPT_DIM, dim)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc(prompt)).to(x.dtype)[:, :, None, None]
        return x + (x * self.gamma + self.beta) * gate


# --------------------------------------------------------------------------- the network


# Top-level modules that stay float32 when the rest of the network runs in fp16 or bf16: the
# islands of the module docstring (prompt network, first and last convolutions, spatial routing).
FLOAT32_ISLANDS = ("dict_generator", "patch_embed", "spatial_routing_", "output")


def cast_backbone(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the AMIR `model` whose backbone holds and computes in `dtype`, the float32
    islands left float32; each backbone module casts its floating inputs to `dtype`. Input and
    output stay float32. Reduced-precision engines are exported from this: autocast's islands
    do not survive `torch.export` into ONNX, explicit casts do."""
    model = copy.deepcopy(model)

    def cast_inputs(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for name, child in model.named_children():
        if not name.startswith(FLOAT32_ISLANDS):
            child.to(dtype)
            child.register_forward_pre_hook(cast_inputs)
    return model


class AMIR(nn.Module):
    """The AMIR generator. Eval mode returns the restored image; training mode returns
    (image, load-balancing loss summed over the three routed encoder levels)."""

    def __init__(
        self,
        inp_channels: int = 1,
        out_channels: int = 1,
        dim: int = 42,
        num_blocks: list[int] = (5, 7, 7, 9),
        num_refinement_blocks: int = 4,
        heads: list[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        LayerNorm_type: str = "WithBias",
    ):
        super().__init__()
        self.config = dict(
            inp_channels=inp_channels,
            out_channels=out_channels,
            dim=dim,
            num_blocks=list(num_blocks),
            num_refinement_blocks=num_refinement_blocks,
            heads=list(heads),
            ffn_expansion_factor=ffn_expansion_factor,
            bias=bias,
            LayerNorm_type=LayerNorm_type,
        )
        ffn, ln = ffn_expansion_factor, LayerNorm_type
        self.dict_generator = PromptGenerator(inp_channels)
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)

        self.encoder_level1 = _blocks(num_blocks[0], dim, heads[0], ffn, bias, ln)
        self.spatial_routing_encoder_level1 = SpatialRouting(dim, ffn)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = _blocks(num_blocks[1], dim * 2, heads[1], ffn, bias, ln)
        self.spatial_routing_encoder_level2 = SpatialRouting(dim * 2, ffn)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = _blocks(num_blocks[2], dim * 4, heads[2], ffn, bias, ln)
        self.spatial_routing_encoder_level3 = SpatialRouting(dim * 4, ffn)
        self.down3_4 = Downsample(dim * 4)
        self.latent = _blocks(num_blocks[3], dim * 8, heads[3], ffn, bias, ln)
        self.channel_routing_latent = ChannelRouting(dim * 8)

        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = _blocks(num_blocks[2], dim * 4, heads[2], ffn, bias, ln)
        self.channel_routing_decoder_level3 = ChannelRouting(dim * 4)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = _blocks(num_blocks[1], dim * 2, heads[1], ffn, bias, ln)
        self.channel_routing_decoder_level2 = ChannelRouting(dim * 2)
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = _blocks(num_blocks[0], dim * 2, heads[0], ffn, bias, ln)
        self.channel_routing_decoder_level1 = ChannelRouting(dim * 2)

        self.refinement = _blocks(num_refinement_blocks, dim * 2, heads[0], ffn, bias, ln)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, inp_img: torch.Tensor):
        # The prompt network and the first and last convolutions see the image itself: they
        # stay float32 under autocast (cheap, and where rounding would hurt the result most).
        with torch.autocast(inp_img.device.type, enabled=False):
            inp_img = _full_precision(inp_img)
            prompt = self.dict_generator(inp_img)
            x = self.patch_embed(inp_img)

        # Each level routes its input, then runs its Transformer blocks.
        x, loss1 = self.spatial_routing_encoder_level1(x, prompt)
        enc1 = self.encoder_level1(x)
        x, loss2 = self.spatial_routing_encoder_level2(self.down1_2(enc1), prompt)
        enc2 = self.encoder_level2(x)
        x, loss3 = self.spatial_routing_encoder_level3(self.down2_3(enc2), prompt)
        enc3 = self.encoder_level3(x)
        x = self.latent(self.channel_routing_latent(self.down3_4(enc3), prompt))

        x = self.reduce_chan_level3(torch.cat([self.up4_3(x), enc3], 1))
        x = self.decoder_level3(self.channel_routing_decoder_level3(x, prompt))
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), enc2], 1))
        x = self.decoder_level2(self.channel_routing_decoder_level2(x, prompt))
        x = torch.cat([self.up2_1(x), enc1], 1)
        x = self.decoder_level1(self.channel_routing_decoder_level1(x, prompt))

        x = self.refinement(x)
        with torch.autocast(inp_img.device.type, enabled=False):
            out = self.output(x.to(inp_img.dtype)) + inp_img
        if self.training:
            return out, loss1 + loss2 + loss3
        return out
