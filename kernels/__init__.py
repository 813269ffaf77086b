"""Triton kernels of fastdistil, installed as fastdistil.kernels (one op per module)."""
