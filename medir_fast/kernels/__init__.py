"""Triton kernels for AMIR (installed as `medir_fast.kernels`): one module per fused op, each
with a thin launch wrapper taking NCHW tensors (float32, bfloat16 or float16).

layernorm.layernorm_channels, channel_routing.channel_routing, dwconv.dwconv3x3,
gdfn.gdfn_gate, mdta.mdta_attention, spatial_routing.spatial_routing.
Importing a module imports Triton; this package itself does not.
"""
