"""The plugins' Triton kernels run in Triton's interpreter here, on the CPU, as in CI.

TRITON_INTERPRET is set when this conftest is imported, before any test module imports
a kernel module (``triton.jit`` picks interpreted or compiled when it runs). The variable
then stays set for the rest of the pytest session; the torch ops send CPU tensors through
the kernels while it is set (see plugins.*.torch_op).

The test modules skip their kernel tests, saying so, only where Triton is not importable.
"""

import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"

HAVE_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not installed: the plugins' Triton kernels cannot run (pip install triton)"



COMPILE = """
import re
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "nvidia" not in triton.backends.backends:
    print("NO NVIDIA BACKEND"); sys.exit(0)

def compile_for_hopper(jit, signature, constexprs):
    # sm_87 (Orin, the automotive target) and sm_90 (Hopper); atomics as sm_90's PTX has them.
    sig = {name: signature.get(name, "constexpr") for name in jit.arg_names}
    for arch in (87, 90):
        k = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
        assert k.asm["cubin"], arch
    # Instructions, not substrings: "red." is also in "shared.".
    return re.search(r"\\b(?:atom|red)\\.", k.asm["ptx"]) is not None
"""


def compile_for_hopper(script: str, tmp_path) -> str:
    """Runs ``script`` after COMPILE's prelude in a fresh Python without TRITON_INTERPRET: the
    kernels compiled (not interpreted) to sm_87 and sm_90 cubins with Triton's bundled ptxas, the code
    a GPU runs, checked without one. A fresh process because Triton's own @triton.jit library
    (and gluon's copy of it, which the compiler imports) takes the mode Triton was imported
    in, here the interpreter's. Returns stdout; skips if Triton has no NVIDIA backend."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE + script], check=False, cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    if "NO NVIDIA BACKEND" in done.stdout:
        pytest.skip("Triton's NVIDIA backend is not installed")
    return done.stdout
