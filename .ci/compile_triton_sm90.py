"""Compile every Triton kernel of rexfast for sm_90 (H100) without a GPU.

Runs the full Triton pipeline (TTIR → TTGIR → LLVM → PTX → cubin via the bundled
ptxas) for representative constexpr configurations, so GPU-only lowering errors
(e.g. a tl.dot block under 16, an unsupported dtype mix, a layout the NVIDIA
backend rejects) show in CI on a CPU machine. Prints one line per kernel config
and exits non-zero if any fails.

    python .ci/compile_triton_sm90.py          # TRITON_INTERPRET must be unset
    PYTHONPATH=.venv/triton36 python .ci/compile_triton_sm90.py --expect-triton 3.6

Written against triton 3.9 (``ASTSource(fn, signature, constexprs, attrs)`` with
constexpr parameters spelled ``"constexpr"`` in the signature and their values
keyed by name); the same spelling works in triton 3.2–3.6. CI runs it twice: with
the venv's triton, and with triton 3.6.x (the GPU image's) installed by pip into a
folder of its own and put first on the path; ``--expect-triton`` makes sure the
second run imported the version it was meant to test.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_triton_sm90.py: unset TRITON_INTERPRET (the interpreter cannot compile for a GPU)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rexfast.ops import registry  # noqa: E402
from rexfast.ops.triton_lib import POINTER_TYPES  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _aligned_attr():
    # What the JIT attaches to 16-byte aligned pointers / ints divisible by 16.
    try:
        from triton.compiler.compiler import make_backend

        return make_backend(TARGET).parse_attr("D")
    except Exception:  # older/newer spelling: compile without alignment hints
        return None


ALIGNED = _aligned_attr()


def compile_config(cfg):
    """Compile one ``rexfast.ops.triton_lib.CompileConfig`` for sm_90."""
    names = cfg.kernel.arg_names
    signature = {}
    for name in names:
        if name in cfg.constexprs:
            signature[name] = "constexpr"
        elif name in cfg.pointers:
            signature[name] = POINTER_TYPES[cfg.pointers[name]]
        else:
            signature[name] = cfg.scalars.get(name, "i32")
    attrs = {}
    if ALIGNED is not None:
        attrs = {(names.index(n),): ALIGNED for n in cfg.aligned}
    src = ASTSource(fn=cfg.kernel, signature=signature, constexprs=dict(cfg.constexprs), attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": cfg.num_warps})


def all_configs():
    """Every op's Triton compile configurations, found through the op registry: each
    Triton module's once (the two region-attention ops share one)."""
    import importlib

    modules = []
    for name, op in sorted(registry.OPS.items()):
        if op.triton_module and op.triton_module not in modules:
            modules.append(op.triton_module)
    return [cfg for module in modules for cfg in importlib.import_module(module).compile_configs()]


def resource_usage(compiled) -> str:
    """Registers/spill stack of the cubin via the cuobjdump bundled with triton (if any)."""
    import re
    import subprocess
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = compiled.asm.get("cubin") if hasattr(compiled, "asm") else None
    if not tool.exists() or cubin is None:
        return "regs=? stack=?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return f"regs={m.group(1)} stack={m.group(2)}B" if m else "regs=? stack=?"


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Compile every Triton kernel of rexfast for sm_90.")
    parser.add_argument("--expect-triton", metavar="VERSION",
                        help="fail unless the imported triton's version starts with this (e.g. 3.6)")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), target {TARGET}")
    if args.expect_triton and not (triton.__version__ + ".").startswith(args.expect_triton.rstrip(".") + "."):
        print(f"FAIL: expected triton {args.expect_triton}.x, imported {triton.__version__}")
        return 1
    failures = 0
    for cfg in all_configs():
        label, warps = cfg.label, cfg.num_warps
        start = time.perf_counter()
        try:
            compiled = compile_config(cfg)
            meta = compiled.metadata
            extra = resource_usage(compiled)
            shared = getattr(meta, "shared", "?")
            print(f"ok    {label}  warps={warps} shared={shared}B {extra} ({time.perf_counter() - start:.1f}s)",
                  flush=True)
        except Exception as exc:  # report every failure, then exit non-zero
            failures += 1
            print(f"FAIL  {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            traceback.print_exc()
    print(f"{failures} failure(s)" if failures else "all Triton kernels compiled for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
