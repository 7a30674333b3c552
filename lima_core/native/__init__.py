"""The native library, lima_core/_C.so (csrc/, built by CMake through scikit-build-core):
loaded once, on first import, for every op it registers (`torch.ops.lima.*`: fused AdamW,
Philox uniforms).

`available()` says whether it loaded; `unavailable_reason()` says why not. Callers fall back
to plain torch when it did not (docs/design.md, decision 9): fused_adamw to torch.optim.AdamW,
philox to the plain-torch Philox emulation.
"""

from __future__ import annotations

import os

import torch

_LIBRARY = "_C.so"


def _load() -> str | None:
    """Loads lima_core/_C.so; returns None, or why it could not."""
    import lima_core

    # An editable install puts the built library in site-packages/lima_core, which
    # lima_core.__path__ lists before the source folder; a wheel has one folder.
    for folder in lima_core.__path__:
        path = os.path.join(folder, _LIBRARY)
        if os.path.isfile(path):
            try:
                torch.ops.load_library(path)
            except (OSError, RuntimeError) as e:
                return f"lima_core._C failed to load from {path}: {e}"
            return None
    return "lima_core._C not built (build it: pip install --no-build-isolation -e .)"


_REASON = _load()


def available() -> bool:
    """True when the native ops are registered."""
    return _REASON is None


def unavailable_reason() -> str:
    """Why the native ops are missing ("" when they are available)."""
    return _REASON or ""
