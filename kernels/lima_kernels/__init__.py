"""lima_kernels: Triton kernels for LLaMA training (usable without lima_core)."""

from . import reference  # noqa: F401
