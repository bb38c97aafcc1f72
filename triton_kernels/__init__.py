"""Triton kernels of arbitrage-fast, each beside the torch reference that defines it."""
