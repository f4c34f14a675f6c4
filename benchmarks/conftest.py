"""Writes every recorded benchmark row when the session ends (benchmarks/.results/,
or benchmarks/results/ with REXFAST_BENCH_RECORD=1 from a clean tree), and skips a
benchmark that would start after ``REXFAST_BENCH_DEADLINE`` (see bench_utils)."""

import os
import time

import pytest

from bench_utils import ceilings, results_dir, write_results

DEADLINE_ENV = "REXFAST_BENCH_DEADLINE"


def pytest_sessionstart(session):
    results_dir()  # a request to record from a dirty tree fails before anything is measured


def pytest_runtest_setup(item):
    # run_device.sh gives each step a share of one GPU call's time: a benchmark that
    # would start past it is skipped (and says so) rather than killed half-way.
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(f"its time budget is spent ({DEADLINE_ENV} passed)")


def pytest_sessionfinish(session, exitstatus):
    write_results()


@pytest.fixture(scope="session")
def cpu_ceilings():
    return ceilings("cpu")
