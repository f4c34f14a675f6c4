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
    config.addinivalue_line("markers", "fuzz: atheris fuzzing of the file readers; runs only with -m fuzz")
    config.addinivalue_line("markers", "browser: drives a real headless Chromium through Selenium")


def pytest_collection_modifyitems(config, items):
    # the fuzzers run only when asked for (-m fuzz, or a -m expression naming them)
    if "fuzz" not in (config.getoption("markexpr", "") or ""):
        skip_fuzz = pytest.mark.skip(reason="fuzzing runs with -m fuzz (REXFAST_FUZZ_SECONDS per target)")
        for item in items:
            if item.get_closest_marker("fuzz") is not None:
                item.add_marker(skip_fuzz)
    if torch.cuda.is_available():
        return
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and os.environ.get("REXFAST_REQUIRE_CUDA", "") == "1":
        # benchmarks/run_device.sh on the GPU machine: a torch that sees no GPU there
        # must stop the run, not turn every GPU test into a skip
        raise pytest.UsageError(f"REXFAST_REQUIRE_CUDA=1, but torch {torch.__version__} sees no CUDA device: "
                                f"{len(gpu_items)} GPU tests cannot run")
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
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


@pytest.fixture(scope="session")
def tiny_cgformer_run(tmp_path_factory):
    """A tiny CGFormer trained one step on 32² synthetic data, shared read-only by the CLI
    tests: the data root, the run folder, best.pt, last.pt, the best/ model folder and an image."""
    return train_tiny_cgformer(tmp_path_factory)


@pytest.fixture(scope="session")
def noisy_tiny_cgformer_run(tmp_path_factory):
    """As tiny_cgformer_run, with Gumbel noise at inference (``eval_noise=True``)."""
    return train_tiny_cgformer(tmp_path_factory, eval_noise=True)


def train_tiny_cgformer(tmp_path_factory, **model_overrides) -> dict:
    """One training step of a tiny CGFormer (``model_overrides`` on its config) on 32² synthetic data."""
    from rexfast.engine import builders
    from rexfast.engine.config import Config, DataConfig, TrainConfig, model_section
    from rexfast.engine.trainer import train

    root = tmp_path_factory.mktemp("data")
    data = DataConfig(dataset="synthetic", root=str(root), image_size=32)
    builders.generate_synthetic_data(data, n_train=8, n_val=4, n_test=4, seed=1)
    out = tmp_path_factory.mktemp("run")
    cfg = Config(data=data, model=model_section({"name": "cgformer", "preset": "tiny", **model_overrides}, data),
                 train=TrainConfig(max_steps=1, epochs=1, batch_size=4, amp="off", device="cpu", out_dir=str(out)))
    train(cfg, progress=False)
    return {"root": root, "out": out, "best": out / "best.pt", "last": out / "last.pt", "folder": out / "best",
            "image": next((root / "synthetic" / "images").glob("*.png"))}
