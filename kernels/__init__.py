"""Triton kernels for AMIR (installed as `medir_fast.kernels`)."""
