"""lima_kernels: Triton kernels for LLaMA training."""
