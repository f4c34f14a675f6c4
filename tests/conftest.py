import os

import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter.
# It must be switched on before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; excluded from the default run (-m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_outputs():
    """Every torch.empty (Python, C++ extension or Triton wrapper) comes back NaN-filled,
    so an output element a kernel forgets to write shows up as NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # Tests pin backends explicitly; a developer's REXFAST_BACKEND must not leak in.
    monkeypatch.delenv("REXFAST_BACKEND", raising=False)
    yield


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
