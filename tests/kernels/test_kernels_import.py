"""lima_kernels stands alone: it imports where lima_core is not importable, and its
reference module imports where triton is not importable either. Importing the package does
not import triton (so TRITON_INTERPRET may be set after lima_core imported the reference)."""

import os
import subprocess
import sys
import textwrap

_BLOCKER = textwrap.dedent(
    """
    import sys

    class _Block:
        def __init__(self, names):
            self.names = names

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, _Block(BLOCKED))
    """
)


def _run(blocked: set, body: str) -> subprocess.CompletedProcess:
    code = _BLOCKER.replace("BLOCKED", repr(sorted(blocked))) + textwrap.dedent(body)
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_without_lima_core():
    proc = _run(
        {"lima_core"},
        """
        import lima_kernels
        assert "triton" not in sys.modules  # the Triton ops load on first access
        assert all(callable(getattr(lima_kernels, n)) for n in lima_kernels._OPS)
        assert "triton" in sys.modules and "lima_core" not in sys.modules
        try:
            import lima_core  # noqa: F401 (imported only to see that it is blocked)
        except ImportError:
            pass
        else:
            raise AssertionError("the blocker did not block lima_core")
        print("ok")
        """,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_reference_imports_without_triton():
    proc = _run(
        {"lima_core", "triton"},
        """
        import torch
        from lima_kernels import reference
        x = torch.randn(3, 8)
        reference.rms_norm(x, torch.ones(8), 1e-6)
        import lima_kernels
        try:
            lima_kernels.rms_norm
        except ImportError as e:
            assert "needs triton" in str(e)
        else:
            raise AssertionError("rms_norm should be unavailable without triton")
        assert "triton" not in sys.modules
        print("ok")
        """,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_interpreter_can_be_chosen_after_import():
    """lima_core imports lima_kernels.reference before a conftest may set TRITON_INTERPRET;
    the ops still run interpreted, and a submodule import keeps the op a function."""
    code = textwrap.dedent(
        """
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        import lima_kernels
        from lima_kernels import reference
        os.environ["TRITON_INTERPRET"] = "1"
        from lima_kernels.ops.rms_norm import RMSNorm  # noqa: F401 (the submodule import is what is tested)
        assert callable(lima_kernels.rms_norm)
        x, w = torch.randn(3, 16), torch.randn(16)
        # fp32: only the reduction order differs.
        torch.testing.assert_close(lima_kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
