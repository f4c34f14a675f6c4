"""Writes every recorded benchmark row when the session ends (benchmarks/.results/,
or benchmarks/results/ with REXFAST_BENCH_RECORD=1 from a clean tree)."""

import pytest

from bench_utils import ceilings, results_dir, write_results


def pytest_sessionstart(session):
    results_dir()  # a request to record from a dirty tree fails before anything is measured


def pytest_sessionfinish(session, exitstatus):
    write_results()


@pytest.fixture(scope="session")
def cpu_ceilings():
    return ceilings("cpu")
