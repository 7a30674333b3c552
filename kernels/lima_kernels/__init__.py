"""lima_kernels: Triton kernels for LLaMA training (usable without lima_core).

Public ops (Triton, CUDA tensors; CPU tensors only under TRITON_INTERPRET=1):
    rms_norm(x, weight, eps)
    rotary(x, cos, sin)
    dropout_add(x, residual, p, seed, offset)
    dropout_add_rms_norm(x, residual, weight, p, seed, offset, eps)
    linear_cross_entropy(hidden, weight, labels, ignore_index=-100, *, chunk_size=None)
their nn.Module drop-ins RMSNorm (for transformers' LlamaRMSNorm), Rotary, DropoutAddRMSNorm
and LinearCrossEntropy, and `reference`, the same functions in plain torch.

Each op is registered as a torch.library custom op in the `lima_kernels` namespace, so a
compiled model calls it without graph breaks.

The Triton ops (files in `lima_kernels/ops/`) load on first access: importing
`lima_kernels` or `lima_kernels.reference` does not import triton, so the reference works
where triton is missing, and TRITON_INTERPRET may still be set after importing this package
(triton reads it once, when it is itself imported).
"""

import importlib

from . import reference

# op or module name -> its file in lima_kernels/ops/
_OPS = {
    "rms_norm": "rms_norm",
    "dropout_add_rms_norm": "rms_norm",
    "RMSNorm": "rms_norm",
    "DropoutAddRMSNorm": "rms_norm",
    "rotary": "rotary",
    "Rotary": "rotary",
    "dropout_add": "dropout_add",
    "linear_cross_entropy": "linear_cross_entropy",
    "LinearCrossEntropy": "linear_cross_entropy",
}

__all__ = ["reference", *_OPS]


def __getattr__(name):
    """Import an op's file (and triton) on first use of the op or its module."""
    if name not in _OPS:
        raise AttributeError(f"module 'lima_kernels' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.ops.{_OPS[name]}")
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] == "triton":
            where = f".{name} is" if hasattr(reference, name) else " has"
            hint = f"lima_kernels.reference{where} the plain-torch version"
            raise ImportError(f"lima_kernels.{name} needs triton ({err}); {hint}") from err
        raise
    globals()[name] = fn = getattr(module, name)
    return fn


def __dir__():
    return sorted([*globals(), *_OPS])
