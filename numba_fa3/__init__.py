"""FlashAttention-3 style attention kernels and their NumPy reference models."""
