"""Triton kernels for APuDAE's per-step update, each beside its PyTorch reference.

Importing this package never imports triton; the kernel modules do, lazily.
"""
