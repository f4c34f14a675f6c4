"""Benchmark session plumbing: the plain ``pytest benchmarks/`` runs the quick set (every row
not marked ``slow``; the full-size CPU inference and training rows are, and run with
``-m slow``, or ``-m "slow or not slow"`` for everything); a progress line names each row as it
starts; every recorded row is written when the session ends (benchmarks/.results/, or
benchmarks/results/ with REXFAST_BENCH_RECORD=1 from a clean tree).
A benchmark that would start after ``REXFAST_BENCH_DEADLINE`` is skipped (see bench_utils)."""

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


def pytest_collection_modifyitems(config, items):
    """Without ``-m``, leave out the rows marked slow (each takes minutes on a small CPU), unless
    a row was asked for by its id (``pytest benchmarks/x.py::test_y``)."""
    if config.getoption("markexpr", ""):
        return
    # an argument such as path/test_x.py::test_y[param] names rows: file name and test name (prefix)
    named = [(a.split("::", 1)[0].rsplit("/", 1)[-1], a.split("::", 1)[1]) for a in config.args if "::" in a]
    kept, left = [], []
    for item in items:
        path, _, name = item.nodeid.partition("::")
        asked = any(path.endswith(f) and name.startswith(n) for f, n in named)
        (left if item.get_closest_marker("slow") and not asked else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept


def pytest_report_header(config):
    return ("rexfast benchmarks: the quick set; the full-size rows marked slow run with -m slow "
            "(everything: -m 'slow or not slow')")


def pytest_runtest_logstart(nodeid, location):
    """One line per row as it starts, so that a user sees what is being measured."""
    import sys

    _progress["done"] += 1
    reporter = _progress.get("reporter")
    line = f"[bench {_progress['done']}/{_progress['total']}] measuring {nodeid}"
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(line)
    else:
        print(line, file=sys.stderr)


_progress = {"done": 0, "total": 0}


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    _progress["total"] = len(session.items)
    _progress["reporter"] = session.config.pluginmanager.get_plugin("terminalreporter")


def pytest_sessionfinish(session, exitstatus):
    write_results()


@pytest.fixture(scope="session")
def cpu_ceilings():
    return ceilings("cpu")
