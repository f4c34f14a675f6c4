"""Fuzz one target with atheris (libFuzzer): ``python tests/fuzz/fuzz_main.py TARGET [libFuzzer flags] CORPUS...``.

The readers' modules (``Target.instrument``) are imported under atheris' coverage
instrumentation; the process's address space is capped (fuzz_harness.cap_address_space)
after the imports; every input goes through fuzz_harness.check_one. A contract violation or
an undocumented exception is a crash: libFuzzer prints the traceback and writes the input to
``-artifact_prefix``. test_fuzz.py runs this under ``MALLOC_CHECK_=3``, so that a heap write
out of bounds in C code aborts at the input that made it.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris  # noqa: E402


def main() -> None:
    name = sys.argv.pop(1)
    import fuzz_harness

    target = fuzz_harness.TARGETS[name]
    with atheris.instrument_imports(include=list(target.instrument)):
        import json  # noqa: F401
        import pickle  # noqa: F401
        import pickletools  # noqa: F401

        if name == "refer":
            import rexfast.data.refer  # noqa: F401
        elif name == "checkpoint":
            import zipfile  # noqa: F401

            import torch.serialization  # noqa: F401

            import rexfast.engine.checkpoint  # noqa: F401
        elif name == "model_folder":
            import rexfast.models.loading  # noqa: F401
            import rexfast.models.pretrained  # noqa: F401
            import rexfast.models.registry  # noqa: F401
            import safetensors.torch  # noqa: F401
        elif name == "annotations":
            import pycocotools.mask  # noqa: F401

            import rexfast.data.masks  # noqa: F401
            import rexfast.data.refer  # noqa: F401
        elif name == "image":
            import PIL.Image  # noqa: F401

            import rexfast.io  # noqa: F401
            import rexfast.serve.checks  # noqa: F401
        elif name == "pairs":
            import csv  # noqa: F401

            import PIL.Image  # noqa: F401

            import rexfast.data.pairs  # noqa: F401
    folder = fuzz_harness.fresh_folder(target)
    fuzz_harness.install_guards(folder)
    if name in ("image", "pairs"):  # PIL's decoders register as plugins on first open
        from PIL import Image

        Image.init()
    fuzz_harness.cap_address_space()

    def one_input(data: bytes) -> None:
        fuzz_harness.check_one(target, data, folder)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
