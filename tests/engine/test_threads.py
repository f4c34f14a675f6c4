"""``--threads N`` on predict, eval and serve: torch.set_num_threads before anything loads;
anything but a positive integer up to the CPUs this process may use is one ``rexfast: error:`` line."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from rexfast import cli

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


COMMANDS = {
    "predict": ["predict", "--checkpoint", "missing-model", "--image", "x.png", "--text", "the dog"],
    "eval": ["eval", "--checkpoint", "missing-model"],
    "serve": ["serve", "missing-model", "--port", str(_free_port())],
}


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_threads_is_set_before_the_model_loads(threads_restored, capsys, command):
    torch.set_num_threads(2)  # torch takes 2 on any machine, 1 CPU included: a change to 1 is seen
    assert torch.get_num_threads() == 2
    # the image or model is missing: the command fails there, after the thread count is set
    assert cli.main([*COMMANDS[command], "--threads", "1"]) == 2
    assert torch.get_num_threads() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rexfast: error:") and "not found" in err[0], err


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", str(CPUS + 1)])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_threads_is_one_error_line(threads_restored, capsys, command, value):
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as raised:  # argparse's refusal exits; the CPU bound returns 2
        code = cli.main([*COMMANDS[command], "--threads", value])
        raise SystemExit(code)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rexfast: error:") and "--threads" in err[0], err
    assert torch.get_num_threads() == 1  # nothing was set


def test_without_threads_torch_keeps_its_own(threads_restored):
    torch.set_num_threads(1)
    assert cli.main([*COMMANDS["eval"]]) == 2
    assert torch.get_num_threads() == 1


def test_one_cpu_is_one_cpu(threads_restored, capsys, monkeypatch):
    """The bound is the CPUs this process may run on (``taskset -c 0``: 1), said in good grammar."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    torch.set_num_threads(1)
    assert cli.main([*COMMANDS["eval"], "--threads", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("rexfast: error: --threads 2 is more than the 1 CPU this process may "
                                               "run on: more threads than cores only make them wait for each other")
    assert torch.get_num_threads() == 1
