"""Rewrites the two pieces of CUDA syntax a host C++ compiler cannot parse.

* ``kernel<targs><<<grid, block, smem, stream>>>(args)`` becomes
  ``::sim::launch(kernel<targs>, "kernel<targs>", ::sim::LaunchConfig(grid, block, smem, stream))(args)``;
  the argument list is left as it is (``Launcher::operator()`` takes it).
* ``extern __shared__ [__align__(n)] T name[];`` (dynamic shared memory) becomes
  ``#define name (reinterpret_cast<T*>(::sim::dynamic_smem()))``.

Everything else (``__global__``, ``__shared__``, ``threadIdx``, intrinsics, the
CUDA headers) is handled by ``include/cuda_sim.h`` and its stand-in headers.
Comments and string literals are left alone, line numbers are kept, and a
``#line`` directive names the original file, so compiler messages point into
``kernels/``. Anything that looks like CUDA syntax but is not in one of these
forms is an error rather than a silent mistranslation.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_EXTERN_SHARED = re.compile(
    r"^[ \t]*extern[ \t]+__shared__[ \t]+(?:__align__[ \t]*\([ \t]*\d+[ \t]*\)[ \t]+)?"
    r"(?P<type>[A-Za-z_][\w:]*(?:[ \t]+[A-Za-z_][\w:]*)*)[ \t]+(?P<name>[A-Za-z_]\w*)[ \t]*\[[ \t]*\][ \t]*;[ \t]*$",
    re.M,
)


def code_mask(src: str) -> list[bool]:
    """True for every character of ``src`` that is code (not in a comment, string or char literal)."""
    mask = [True] * len(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment")
            j += 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            mask[k] = False
        i = j
    return mask


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression ``name<targs>`` (or ``ns::name``) that ends at ``end``."""
    i = end
    while i > 0 and src[i - 1] in " \t\n":
        i -= 1
    if i > 0 and src[i - 1] == ">":  # template arguments: match the brackets backwards
        depth = 0
        while i > 0:
            i -= 1
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    break
        else:
            raise ValueError("unbalanced template arguments before <<<")
        while i > 0 and src[i - 1] in " \t":
            i -= 1
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def translate(src: str, filename: str) -> str:
    """The host-compilable text of the CUDA source ``src`` (named ``filename`` in diagnostics)."""

    def shared(m: re.Match) -> str:
        return f"#define {m.group('name')} (reinterpret_cast<{m.group('type')}*>(::sim::dynamic_smem()))"

    mask = code_mask(src)
    out, pos = [], 0
    for m in _EXTERN_SHARED.finditer(src):
        if mask[m.start("name")]:
            out.append(src[pos:m.start()])
            out.append(shared(m))
            pos = m.end()
    src = "".join(out) + src[pos:]
    mask = code_mask(src)
    for m in re.finditer(r"extern\s+__shared__", src):
        if mask[m.start()]:
            line = src.count("\n", 0, m.start()) + 1
            raise ValueError(f"{filename}:{line}: unsupported extern __shared__ declaration "
                             "(one `extern __shared__ [__align__(n)] T name[];` per line)")

    out, pos = [], 0
    while True:
        i = src.find("<<<", pos)
        while i >= 0 and not mask[i]:
            i = src.find("<<<", i + 3)
        if i < 0:
            break
        j = src.find(">>>", i + 3)
        while j >= 0 and not mask[j]:
            j = src.find(">>>", j + 3)
        line = src.count("\n", 0, i) + 1
        if j < 0:
            raise ValueError(f"{filename}:{line}: <<< without >>>")
        config = src[i + 3:j]
        if config.count("(") != config.count(")") or not config.strip():
            raise ValueError(f"{filename}:{line}: cannot parse the launch configuration {config!r}")
        start = _kernel_start(src, i)
        kernel = " ".join(src[start:i].split())
        if not re.fullmatch(r"[A-Za-z_:][\w:]*\s*(<.*>)?", kernel):
            raise ValueError(f"{filename}:{line}: cannot parse the kernel name before <<< ({kernel!r})")
        k = j + 3
        while k < len(src) and src[k] in " \t\n":
            k += 1
        if k >= len(src) or src[k] != "(":
            raise ValueError(f"{filename}:{line}: expected the kernel's argument list after >>>")
        label = kernel.replace("\\", "\\\\").replace('"', '\\"')
        out.append(src[pos:start])
        # the kernel expression as written (its newlines, if any, keep the line count)
        out.append(f'::sim::launch({src[start:i]}, "{label}", ::sim::LaunchConfig({config}))')
        out.append(src[j + 3:k])  # keep the whitespace (and its newlines) before the arguments
        pos = k
    out.append(src[pos:])
    text = "".join(out)
    assert text.count("\n") == src.count("\n"), "translation must keep line numbers"
    return f'#line 1 "{filename}"\n' + text


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: sim_translate.py SOURCE.cu OUTPUT.cpp", file=sys.stderr)
        return 2
    source = Path(argv[1])
    Path(argv[2]).write_text(translate(source.read_text(), str(source.resolve())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
