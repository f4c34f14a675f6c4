"""Fixtures of the cuda_sim tests: the library, built once per session (and cached
across sessions, see cuda_sim_build.py), and a fresh simulated context per test."""

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "ops"):  # this folder's modules; the op specs and the harness of tests/ops
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import cuda_sim_build  # noqa: E402
from cuda_sim_lib import Sim  # noqa: E402
from harness import in_ci  # noqa: E402

# The schedule of a block's threads and the OS threads running blocks; the whole set
# can be rerun under others (a kernel whose results depend on them has a race):
#   REXFAST_CUDA_SIM_SCHEDULE=reverse|random REXFAST_CUDA_SIM_WORKERS=2 pytest tests/cuda_sim
DEFAULTS = dict(workers=int(os.environ.get("REXFAST_CUDA_SIM_WORKERS", "1")),
                schedule=os.environ.get("REXFAST_CUDA_SIM_SCHEDULE", "forward"),
                seed=int(os.environ.get("REXFAST_CUDA_SIM_SEED", "0")), smem_optin=232448)


def _report_fd(config) -> int:
    """The real stderr: pytest captures fd 2, so a kernel's invalid-access report written
    there would vanish with the crashing process; pytest's faulthandler keeps a copy."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):
        return 2


@pytest.fixture(scope="session")
def sim_library(pytestconfig):
    try:
        sim = Sim(cuda_sim_build.build())
    except cuda_sim_build.BuildError as e:
        if in_ci():  # CI has the compiler: a build failure is a failure, never a skip
            pytest.fail(str(e))
        pytest.skip(f"cuda_sim cannot be built here: {e}")
    sim.configure(report_fd=_report_fd(pytestconfig))
    return sim


@pytest.fixture
def sim(sim_library):
    """The simulated device, reset (no error, empty launch log, default settings). The
    references run with one torch thread: the simulation is single-threaded, and idle
    OpenMP workers spinning next to it would only take the second core away."""
    sim_library.reset()
    sim_library.configure(**DEFAULTS)
    sim_library.guard = "back"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield sim_library
    finally:
        torch.set_num_threads(threads)
        sim_library.reset()
