"""The official AMIR's algorithm, for the `official` baseline of `medir-fast bench`.

Same parameters and the same function as `medir_fast.AMIR`, computed the way the official code
computes it (../shared/reference/amir/README.md): the spatial routing sorts pixels per expert
(`nonzero` twice, a sort, `.tolist()` of the expert sizes and a masked assignment: host
synchronisations and data-dependent shapes at every routed level), runs each expert on its
pixels only, combines with `log(sum_k g_k exp(E_k))` (an exactly-zero sum replaced by float64's
epsilon), and computes the load-balancing loss even in eval mode; the LayerNorm is written out
with mean and variance; the routing runs in the autocast dtype (where the official model fails on
CUDA, at its `scatter`). One difference is left: under autocast the prompt network and the first
and last convolutions keep medir-fast's float32 islands (the official code would run them in the
autocast dtype; on CUDA it has failed before that matters). Eval mode only: this is a timing
baseline, not something to train.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model.amir import AMIR, MoE, SpatialRouting, WithBiasLayerNorm, cv_squared

EPSILON = torch.finfo(torch.float64).eps


class OfficialMoE(MoE):
    """Top-k routing by sparse dispatch: each expert sees only the pixels routed to it."""

    def forward(self, x: torch.Tensor, gate_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = gate_input @ self.w_gate
        top, idx = logits.topk(min(self.k + 1, self.num_experts), dim=1)
        gates = torch.zeros_like(logits).scatter(1, idx[:, :self.k], top[:, :self.k].softmax(dim=1))
        loss = cv_squared(gates.sum(0)) + cv_squared((gates > 0).sum(0))
        # the dispatcher: pixels sorted by expert
        sorted_experts, order = torch.nonzero(gates).sort(0)
        expert_index = sorted_experts[:, 1:2]
        batch_index = torch.nonzero(gates)[order[:, 1], 0]
        sizes = (gates > 0).sum(0).tolist()
        chosen_gates = torch.gather(gates[batch_index], 1, expert_index)
        outputs = [expert(part) for expert, part in zip(self.experts, torch.split(x[batch_index], sizes))]
        stitched = torch.cat(outputs, 0).exp() * chosen_gates
        # float32, as the official code combines (float64 stays float64: the tests' reference)
        dtype = torch.promote_types(x.dtype, torch.float32)
        combined = torch.zeros(x.shape[0], x.shape[1], dtype=dtype, device=x.device).index_add(
            0, batch_index, stitched.to(dtype))
        combined[combined == 0] = EPSILON
        return combined.log(), loss


class OfficialSpatialRouting(SpatialRouting):
    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        prompt_term = self.fc(prompt).repeat_interleave(h * w, dim=0)
        y, loss = self.moe(pixels, torch.cat([pixels, prompt_term], dim=1))
        return y.reshape(b, h, w, c).permute(0, 3, 1, 2) + x, loss


class OfficialWithBiasLayerNorm(WithBiasLayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        sigma = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(sigma + 1e-5) * self.weight + self.bias


OFFICIAL_FORWARD = {SpatialRouting: OfficialSpatialRouting, MoE: OfficialMoE, WithBiasLayerNorm: OfficialWithBiasLayerNorm}


def as_official(module: nn.Module) -> nn.Module:
    """The module itself, computing with the official forward from now on (its class swapped for
    the subclass that only overrides `forward`: the same parameters, buffers and keys)."""
    module.__class__ = OFFICIAL_FORWARD.get(type(module), type(module))
    return module


def official_model(model: AMIR) -> AMIR:
    """An eval-mode AMIR with `model`'s weights (a copy) that computes as the official code does."""
    official = AMIR(**model.config)
    official.load_state_dict(model.state_dict())
    for module in official.modules():
        as_official(module)
    param = next(model.parameters())
    return official.to(param.device, param.dtype).eval()
