"""Compile every Triton kernel of rexfast for sm_90 (H100) without a GPU.

Runs the full Triton pipeline (TTIR → TTGIR → LLVM → PTX → cubin via the bundled
ptxas) for representative constexpr configurations, so GPU-only lowering errors
(e.g. a tl.dot block under 16, an unsupported dtype mix, a layout the NVIDIA
backend rejects) show in CI on a CPU machine. Prints one line per kernel config
and exits non-zero if any fails.

    python .ci/compile_triton_sm90.py          # TRITON_INTERPRET must be unset

Written against triton 3.9 (``ASTSource(fn, signature, constexprs, attrs)`` with
constexpr parameters spelled ``"constexpr"`` in the signature and their values
keyed by name); the same spelling works in triton 3.2–3.6.
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

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rexfast.triton import group_assign as ga  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32"}


def _aligned_attr():
    # What the JIT attaches to 16-byte aligned pointers / ints divisible by 16.
    try:
        from triton.compiler.compiler import make_backend

        return make_backend(TARGET).parse_attr("D")
    except Exception:  # older/newer spelling: compile without alignment hints
        return None


ALIGNED = _aligned_attr()


def compile_kernel(kernel, pointer_types: dict, constexprs: dict, num_warps: int, aligned: tuple = ()):
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = _PTR[pointer_types[name]]
        else:
            signature[name] = "i32"
    attrs = {}
    if ALIGNED is not None:
        attrs = {(names.index(n),): ALIGNED for n in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def group_assign_configs():
    """(label, kernel, pointer dtypes, constexprs, num_warps, aligned args)."""
    configs = []
    noise_names = {ga.NOISE_NONE: "none", ga.NOISE_EXPLICIT: "explicit", ga.NOISE_SEEDED: "seeded"}
    plan = [(dt, mode, 2) for dt in (torch.float32, torch.bfloat16, torch.float16) for mode in noise_names]
    plan += [(torch.bfloat16, ga.NOISE_SEEDED, 48), (torch.bfloat16, ga.NOISE_EXPLICIT, 128),
             (torch.float32, ga.NOISE_NONE, 128)]
    for dtype, mode, n in plan:
        native, prec = ga._modes(dtype)
        block_n, block_p, block_c, block_d, fwd_warps, bwd_warps = ga._blocks(n)
        noise_dtype = torch.float32 if mode != ga.NOISE_EXPLICIT else dtype
        const = dict(BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_D=block_d,
                     NOISE_MODE=mode, NATIVE_DOT=native, PREC=prec)
        label = f"{str(dtype).split('.')[-1]:8s} noise={noise_names[mode]:8s} N={n:<3d} BLOCK_N={block_n}"
        common = dict(qh_ptr=torch.float32, k_ptr=dtype, v_ptr=dtype, noise_ptr=noise_dtype, tau_ptr=torch.float32)
        fwd_ptrs = dict(common, assign_ptr=dtype, index_ptr=torch.int32, counts_part_ptr=torch.float32,
                        out_part_ptr=torch.float32)
        bwd_ptrs = dict(common, dout_ptr=dtype, dassign_ptr=dtype, inv_ptr=torch.float32, c_ptr=torch.float32,
                        dk_ptr=dtype, dv_ptr=dtype, dqh_part_ptr=torch.float32, dtau_part_ptr=torch.float32)
        aligned_fwd = tuple(fwd_ptrs) + ("C", "D", "stride_kb", "stride_kp", "stride_vb", "stride_vp")
        aligned_bwd = tuple(bwd_ptrs) + ("C", "D", "stride_kb", "stride_kp", "stride_vb", "stride_vp")
        configs.append((f"group_assign fwd {label}", ga._group_assign_fwd_kernel, fwd_ptrs, const, fwd_warps, aligned_fwd))
        configs.append((f"group_assign bwd {label}", ga._group_assign_bwd_kernel, bwd_ptrs, const, bwd_warps, aligned_bwd))
    # Unaligned variant (odd C/D and strides, e.g. k, v slices of a fused kv tensor).
    native, prec = ga._modes(torch.bfloat16)
    block_n, block_p, block_c, block_d, _, warps = ga._blocks(17)
    const = dict(BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_D=block_d,
                 NOISE_MODE=ga.NOISE_SEEDED, NATIVE_DOT=native, PREC=prec)
    ptrs = dict(qh_ptr=torch.float32, k_ptr=torch.bfloat16, v_ptr=torch.bfloat16, noise_ptr=torch.float32,
                tau_ptr=torch.float32, dout_ptr=torch.bfloat16, dassign_ptr=torch.bfloat16, inv_ptr=torch.float32,
                c_ptr=torch.float32, dk_ptr=torch.bfloat16, dv_ptr=torch.bfloat16, dqh_part_ptr=torch.float32,
                dtau_part_ptr=torch.float32)
    configs.append(("group_assign bwd bfloat16 noise=seeded   N=17  unaligned", ga._group_assign_bwd_kernel, ptrs,
                    const, warps, ()))
    return configs


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


def main() -> int:
    print(f"triton {triton.__version__}, target {TARGET}")
    failures = 0
    for label, kernel, ptrs, const, warps, aligned in group_assign_configs():
        start = time.perf_counter()
        try:
            compiled = compile_kernel(kernel, ptrs, const, warps, aligned)
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
