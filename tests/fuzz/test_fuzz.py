"""The fuzz targets of fuzz_harness: the corpus replayed in the default suite, and
``pytest -m fuzz``, which fuzzes each target for ``REXFAST_FUZZ_SECONDS`` (default 60)
with atheris, from libFuzzer's seed ``REXFAST_FUZZ_SEED`` when set (CI: reproducible) or a
fresh one.

Default suite: every committed corpus file (the seeds, and every crash, timeout or
out-of-memory input a fuzzer found, kept as ``crash-*``/``timeout-*``/``oom-*``) goes through
its target under the contract once, so a fixed finding stays fixed; and the seeds are
what fuzz_seeds.py writes.

``-m fuzz``: each target in a child process under glibc's ``MALLOC_CHECK_=3`` (with
libc_malloc_debug preloaded, which glibc >= 2.34 needs for it), so heap corruption aborts
at the input that caused it. libFuzzer's ``-timeout`` bounds each input's time, the
harness each input's memory (``Target.peak_mb``; ``-rss_limit_mb`` stays as a backstop for
memory that grows over many inputs); a crash's input is written into ``corpus/<target>/`` as a new corpus file (commit it
and fix the reader: it then runs in the default suite). Inputs that only add coverage go
to a working corpus under ``tests/fuzz/.work/`` (not committed), and each run's figures
(inputs executed, coverage, corpus size) to ``tests/fuzz/.work/<target>.json``.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fuzz_harness
from fuzz_harness import CORPUS, HERE, REPO, TARGETS, check_one, corpus_files

WORK = HERE / ".work"


def malloc_check_env() -> dict:
    """glibc's heap checking: MALLOC_CHECK_=3 aborts at the first corrupted chunk; glibc >= 2.34
    honours it only with libc_malloc_debug preloaded."""
    env = {"MALLOC_CHECK_": "3"}
    debug = ctypes.util.find_library("c_malloc_debug")
    if debug:
        env["LD_PRELOAD"] = " ".join(filter(None, [debug, os.environ.get("LD_PRELOAD", "")]))
    return env


# ----------------------------------------------------------------------------- default suite
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, target in TARGETS.items():
        folder = tmp_path_factory.mktemp(f"fuzz-{name}")
        target.setup(folder)
        out[name] = folder
    return out


CASES = [(name, path) for name in TARGETS for path in corpus_files(name)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name, path", CASES, ids=[f"{n}/{p.name}" for n, p in CASES])
def test_corpus_input_keeps_the_contract(folders, monkeypatch, name, path):
    folder = folders[name]
    monkeypatch.chdir(folder)  # restored after the test; a hostile `touch PWNED` would land here
    fuzz_harness.install_guards(folder)
    check_one(TARGETS[name], path.read_bytes(), folder)


@pytest.mark.parametrize("broken, refusing", [("load_image", "open_image"), ("open_image", "load_image"),
                                              ("decode_image", "open_image")])
def test_image_target_does_not_mask_a_forbidden_exception(folders, monkeypatch, broken, refusing):
    """One image reader raising an undocumented exception is a finding even when the other
    reader refuses the same file with its documented ValueError (here: bytes that are no
    image); a ``try/finally`` between the two let the refusal replace the finding."""
    import rexfast.io
    import rexfast.serve.checks

    module = {"load_image": rexfast.io, "decode_image": rexfast.io, "open_image": rexfast.serve.checks}

    def crash(path, *args, **kwargs):
        raise RuntimeError("a reader's bug")

    monkeypatch.setattr(module[broken], broken, crash)
    folder = folders["image"]
    monkeypatch.chdir(folder)
    fuzz_harness.install_guards(folder)
    data = b"not an image at all"
    (folder / "image").write_bytes(data)
    with pytest.raises(ValueError):  # the other reader alone refuses these bytes (documented) ...
        getattr(module[refusing], refusing)(folder / "image")
    with pytest.raises(RuntimeError, match="a reader's bug"):  # ... and does not hide the crash
        check_one(TARGETS["image"], data, folder)


def test_an_input_over_its_memory_budget_is_the_finding(folders, monkeypatch):
    """The peak is measured per input, so the input that made it is the one saved; an
    input within its target's budget passes, and so does the next one after a large one."""
    if fuzz_harness.reset_peak_memory() is None:
        pytest.skip("the peak resident memory cannot be reset here (Linux /proc/self/clear_refs)")
    folder = folders["image"]
    monkeypatch.chdir(folder)
    fuzz_harness.install_guards(folder)

    def allocate(data, folder):
        block = bytearray(int(data) << 20)
        block[::4096] = b"x" * len(block[::4096])  # resident, not just reserved

    target = fuzz_harness.Target("alloc", allocate, (ValueError,), (), peak_mb=64)
    assert check_one(target, b"16", folder) == "ok"
    with pytest.raises(fuzz_harness.ContractViolation, match=r"raised the peak resident memory by \d+ MB, more "
                                                              r"than the 64 MB the alloc target allows"):
        check_one(target, b"200", folder)
    assert check_one(target, b"16", folder) == "ok"


def test_an_input_leaves_no_memory_to_the_next(folders, monkeypatch):
    """corpus/image/oom-tall-bmp-117mp.bmp: a 174-byte BMP of 7 x 16,776,965 pixels, which PIL
    allocates and then finds truncated. The image target kept each input's exceptions in a
    reference cycle (their tracebacks hold the frame that listed them), so every run of it
    left 256 MB resident and 1.15 GB of address space until a full garbage collection: fuzzing
    from seed 2, a later input's allocation failed under the address-space cap (MemoryError);
    from seed 1 (CI's gate), the process died of SIGALRM 6 s in. Four runs now hold what one
    does."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc/self/status (Linux)")

    def resident_mb() -> float:
        return fuzz_harness._status_kb("VmRSS") / 1024

    folder = folders["image"]
    monkeypatch.chdir(folder)
    fuzz_harness.install_guards(folder)
    data = (CORPUS / "image" / "oom-tall-bmp-117mp.bmp").read_bytes()
    after = []
    for _ in range(4):
        assert check_one(TARGETS["image"], data, folder) == "ValueError"
        after.append(resident_mb())
    assert max(after) - after[0] < 64, f"resident memory after each run: {[round(m) for m in after]} MB"


def test_image_budget_follows_the_pixel_limit():
    from rexfast.io import DEFAULT_MAX_IMAGE_PIXELS

    assert fuzz_harness.IMAGE_PEAK_MB == (16 * DEFAULT_MAX_IMAGE_PIXELS >> 20) + 256


def test_model_folder_target_reads_config_json_as_the_loader_does(folders, monkeypatch):
    """Old configs that still hold runtime options load (the options are split out, as
    load_model_source does), and a hostile option value reaches the options' own checks."""
    import json

    from fuzz_harness import join_model_folder, split_model_folder

    folder = folders["model_folder"]
    monkeypatch.chdir(folder)
    fuzz_harness.install_guards(folder)
    target = TARGETS["model_folder"]
    old = corpus_files("model_folder")
    old = [p for p in old if p.name.startswith("old-config-with-runtime-keys-")]
    assert len(old) == 2
    for path in old:
        assert check_one(target, path.read_bytes(), folder) == "ok", path.name
    config, weights = split_model_folder(old[0].read_bytes())
    fields = json.loads(config)
    for value, error, message in (("bogus", ValueError, "ops_backend must be one of reference, cpu, cuda, triton"),
                                  (5, ValueError, "model.ops_backend: expected a string")):
        hostile = join_model_folder(json.dumps({**fields, "ops_backend": value}).encode(), weights)
        with pytest.raises(error, match=message):
            target.run(hostile, folder)
        assert check_one(target, hostile, folder) == error.__name__


def test_every_target_has_seeds():
    for name in TARGETS:
        assert any(p.name.startswith("seed-") for p in corpus_files(name)), name


def test_seeds_are_what_fuzz_seeds_writes(tmp_path):
    import fuzz_seeds

    fuzz_seeds.write_seeds(tmp_path)
    for name in TARGETS:
        made = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
        committed = {p.name: p.read_bytes() for p in corpus_files(name) if p.name.startswith("seed-")}
        assert made == committed, f"{name}: run python tests/fuzz/fuzz_seeds.py and commit the seeds"


# ----------------------------------------------------------------------------- pytest -m fuzz
def fuzz_seconds() -> int:
    raw = os.environ.get("REXFAST_FUZZ_SECONDS", "60")
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"REXFAST_FUZZ_SECONDS must be a whole number of seconds >= 1, got {raw!r}")
    return seconds


def fuzz_seed() -> int | None:
    """``REXFAST_FUZZ_SEED``: libFuzzer's ``-seed``. CI sets one, so that its run mutates the
    same inputs in the same order every time and a finding reproduces with the same command;
    unset, libFuzzer draws a seed (exploration: every run tries new mutations)."""
    raw = os.environ.get("REXFAST_FUZZ_SEED", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"REXFAST_FUZZ_SEED must be a whole number >= 1, got {raw!r}")
    return int(raw)


def parse_libfuzzer(log: str) -> dict:
    """Inputs executed, coverage and corpus from libFuzzer's last status line (``#N DONE cov: …``)."""
    status = [m for m in re.finditer(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", log, re.M)]
    out = {}
    if status:
        last = status[-1]
        out.update(inputs=int(last.group(1)), coverage_edges=int(last.group(3)), features=int(last.group(4)),
                   corpus_inputs=int(last.group(5)), corpus_size=last.group(6))
    done = re.search(r"^Done (\d+) runs in (\d+) second", log, re.M)
    if done:
        out.update(inputs=int(done.group(1)), seconds=int(done.group(2)))
    return out


@pytest.mark.fuzz
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz(name):
    pytest.importorskip("atheris", reason="fuzzing needs atheris: pip install -e .[fuzz]")
    seconds = fuzz_seconds()
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    for path in corpus_files(name):  # the committed corpus seeds the working one
        shutil.copyfile(path, work / path.name)
    before = set(corpus_files(name))
    cmd = [sys.executable, str(HERE / "fuzz_main.py"), name, f"-max_total_time={seconds}",
           f"-timeout={int(fuzz_harness.INPUT_SECONDS)}", f"-rss_limit_mb={fuzz_harness.RSS_LIMIT_MB}",
           "-max_len=65536", "-print_final_stats=1", f"-artifact_prefix={CORPUS / name}{os.sep}", str(work)]
    seed = fuzz_seed()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **malloc_check_env())
    if seed is not None:
        cmd.insert(3, f"-seed={seed}")  # a libFuzzer flag, after the script and the target's name
        env["PYTHONHASHSEED"] = "0"  # set and dict orders the same in every run too
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=seconds + 600)
    log = proc.stdout + proc.stderr
    stats = dict(parse_libfuzzer(log), target=name, seconds_asked=seconds, seed=seed, returncode=proc.returncode)
    new = sorted(set(corpus_files(name)) - before)
    stats["findings"] = [p.name for p in new]
    (WORK / f"{name}.json").write_text(json.dumps(stats, indent=1) + "\n")
    (WORK / f"{name}.log").write_text(log)
    assert not new, (
        f"fuzzing {name} found {len(new)} input(s) that break the contract, saved as "
        f"{[str(p.relative_to(REPO)) for p in new]}:\n{log[-6000:]}")
    assert proc.returncode == 0, f"the fuzzer of {name} exited with {proc.returncode}, no input saved:\n{log[-6000:]}"
    assert stats.get("inputs", 0) > 0, log[-3000:]
