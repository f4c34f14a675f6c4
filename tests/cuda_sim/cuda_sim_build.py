"""Builds the cuda_sim shared library: kernels/*.cu and the self-test kernels,
translated by :mod:`sim_translate` and compiled with the host C++ compiler against
``include/`` (the execution layer and stand-ins for the CUDA headers), plus the
runtime and the flat C entry points the tests call through ctypes.

One object per source, cached under a key of everything that can change it (the
source, every header, the translator, this file, the compiler's version and the
flags), in ``$REXFAST_CUDA_SIM_CACHE`` or ``<tmp>/rexfast-cuda-sim-<uid>``; a file
lock serialises concurrent builds (pytest-xdist workers, several checkouts).
Compiles run one at a time (the machines this runs on are small and shared).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import sim_translate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "kernels"
INCLUDE = HERE / "include"

# (source, translated from CUDA?)
SOURCES = [
    *((p, True) for p in sorted(KERNELS.glob("*.cu"))),
    (HERE / "src" / "selftest.cu", True),
    (HERE / "src" / "kernel_api.cpp", False),
    (HERE / "src" / "sim_runtime.cpp", False),
]
# -ffp-contract=off: every a*b+c rounds twice, as written (nvcc would fuse some:
# the simulation cannot see that contraction, see include/cuda_sim.h).
FLAGS = ["-std=c++20", "-O1", "-g0", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-Wall",
         "-Wno-unknown-pragmas"]


class BuildError(RuntimeError):
    """The compiler is missing or rejected a source (the message holds its output)."""


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildError("no C++ compiler (g++ or $CXX) on PATH")
    return cxx


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:20]


def _headers() -> list[Path]:
    files = [p for p in INCLUDE.rglob("*") if p.is_file()]
    files += [p for p in KERNELS.iterdir() if p.suffix in (".cuh", ".h")]
    return sorted(files) + [HERE / "sim_translate.py", Path(__file__).resolve()]


def cache_dir() -> Path:
    env = os.environ.get("REXFAST_CUDA_SIM_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"rexfast-cuda-sim-{os.getuid()}"


def build(log=None) -> Path:
    """Path of the shared library for the current sources (built if needed)."""
    cxx = compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"{cxx} --version failed: {e}") from e
    common = _digest(version.encode(), " ".join(FLAGS).encode(),
                     *(p.name.encode() + p.read_bytes() for p in _headers()))
    out = cache_dir()
    (out / "obj").mkdir(parents=True, exist_ok=True)
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        objects = []
        for src, is_cuda in SOURCES:
            key = _digest(common.encode(), src.read_bytes(), str(is_cuda).encode())
            obj = out / "obj" / f"{src.stem}-{key}.o"
            if not obj.exists():
                _compile(cxx, src, is_cuda, obj, log)
            objects.append(obj)
        lib = out / f"libcudasim-{_digest(*(o.name.encode() for o in objects))}.so"
        if not lib.exists():
            tmp = lib.with_suffix(".tmp")
            _run([cxx, "-shared", "-pthread", "-o", str(tmp), *map(str, objects)], "link")
            os.replace(tmp, lib)
        return lib


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"cuda_sim: {what} failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def _compile(cxx: str, src: Path, is_cuda: bool, obj: Path, log) -> None:
    if log:
        log(f"cuda_sim: compiling {src.relative_to(ROOT)}")
    with tempfile.TemporaryDirectory(dir=obj.parent) as tmp:
        if is_cuda:
            unit = Path(tmp) / (src.stem + ".cpp")
            unit.write_text(sim_translate.translate(src.read_text(), str(src)))
            lang = ["-x", "c++"]
        else:
            unit, lang = src, []
        part = Path(tmp) / obj.name
        _run([cxx, *FLAGS, f"-I{INCLUDE}", f"-I{KERNELS}", *lang, "-c", str(unit), "-o", str(part)],
             f"compiling {src}")
        os.replace(part, obj)


if __name__ == "__main__":
    print(build(log=print))
