"""Say what the built rexfast._C holds, and fail when it lacks what this run needs.

    python benchmarks/check_extension.py --require-cuda   # run_device.sh on the GPU machine
    python benchmarks/check_extension.py                  # its dry run: the CPU kernels only

Why: setup.py builds the CUDA kernels only when it finds nvcc and a CUDA torch, and says so
in one line of a long build log. A build that left them out still imports, and the ops then
pick Triton or the reference: the run would report skipped CUDA tests and no CUDA rows, not
a failure. This makes it one.
"""

import argparse
import sys

from rexfast.ops import registry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true", help="fail unless the CUDA kernels are built in")
    args = parser.parse_args(argv)
    built, has_cuda = registry.extension_built(), registry.extension_has_cuda()
    print(f"rexfast._C built: {built}" + ("" if built else f" ({registry.extension_error()})"))
    print(f"extension_has_cuda(): {has_cuda}")
    for name, op in sorted(registry.OPS.items()):
        print(f"  {name}: cpu tensors {op.available('cpu')}, cuda tensors {op.available('cuda')}")
    if not built:
        print("FAIL: rexfast._C is not importable: see the build log", file=sys.stderr)
        return 1
    if args.require_cuda and not has_cuda:
        print("FAIL: rexfast._C was built without its CUDA kernels (the build log's 'rexfast: CUDA kernels OFF' "
              "line says why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
