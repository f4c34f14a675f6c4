"""Writes every recorded benchmark row to benchmarks/results/ when the session ends."""

import pytest

from bench_utils import ceilings, write_results


def pytest_sessionfinish(session, exitstatus):
    write_results()


@pytest.fixture(scope="session")
def cpu_ceilings():
    return ceilings("cpu")
