"""Fused Triton kernels of fastcal (installed as ``fastcal.kernels``)."""
