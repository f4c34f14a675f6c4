"""The per-op backend registry: dispatch order, fallbacks, errors, and what `import rexfast` pulls in."""

import logging
import subprocess
import sys

import pytest
import torch

from rexfast.ops import registry


@pytest.fixture(autouse=True)
def _registry_left_as_found(monkeypatch):
    """The toy ops below register themselves in the global ``registry.OPS`` (and their
    warn-once notes in ``registry._noted``): both go back to what they were after each test,
    or later tests that list every registered op (``rexfast info``, the decompositions) see them."""
    monkeypatch.setattr(registry, "OPS", dict(registry.OPS))
    monkeypatch.setattr(registry, "_noted", set(registry._noted))


def _toy(name, *backends):
    op = registry.OpBackends(name)
    for b in backends:
        op.register(b)
    return op


def _ref():
    return registry.reference_backend(lambda *a: "ref", None)


def test_import_rexfast_imports_neither_triton_nor_transformers():
    code = ("import sys, rexfast, rexfast.ops, rexfast.ops.decompositions; "
            "bad = [m for m in ('triton', 'transformers', 'torch._dynamo', 'onnx', 'onnxscript', 'onnxruntime', "
            "'tensorrt', 'torch_tensorrt') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"import rexfast imported {proc.stdout.strip()} {proc.stderr[-500:]}"


def test_constant_marker_is_what_assume_constant_result_sets():
    def f():
        return 1

    def g():
        return 1

    torch.compiler.assume_constant_result(f)
    registry._constant_under_compile(g)
    marks = {k for k in vars(f) if k.startswith("_dynamo")}
    assert marks == {k for k in vars(g) if k.startswith("_dynamo")} == {"_dynamo_marked_constant"}


def test_an_op_without_a_kernel_for_the_device_runs_its_reference_with_one_warning(caplog):
    op = _toy("toy_reference_only", _ref())
    with caplog.at_level(logging.INFO, logger="rexfast"):
        assert op.choose(torch.device("cpu"), None) == "reference"
        assert op.choose(torch.device("cpu"), None) == "reference"
        # no Triton kernel: a CUDA tensor is not routed to Triton (no KeyError), it runs the reference
        assert op.choose(torch.device("cuda"), None) == "reference"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("using the PyTorch reference" in r.getMessage() for r in warnings)
    assert any("runs the reference backend" in r.getMessage() for r in caplog.records)


def test_explicit_backends_the_op_lacks_are_refused_with_the_reason():
    op = _toy("toy_reference_only_2", _ref())
    with pytest.raises(RuntimeError, match="has no triton backend"):
        op.choose(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        op.choose(torch.device("cpu"), "gpu")


def test_preference_order_and_env_override(monkeypatch):
    cpu = registry.Backend("cpu", None, None, lambda dt: None if dt == "cpu" else "cpu only")
    op = _toy("toy_two", _ref(), cpu)
    assert op.choose(torch.device("cpu"), None) == "cpu"
    assert op.choose(torch.device("cpu"), "reference") == "reference"
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert op.choose(torch.device("cpu"), None) == "reference"
    assert op.choose(torch.device("cpu"), "cpu") == "cpu", "backend= wins over the environment"
    with pytest.raises(ValueError, match="twice"):
        op.register(_ref())


def test_info_lists_every_op_and_its_backends():
    info = registry.info()
    assert "group_assign" in info["ops"]
    per_device = info["ops"]["group_assign"]["cpu"]
    assert set(per_device) == {"reference", "cpu", "cuda", "triton"}
    assert per_device["reference"] == "available"
    assert "CPU tensors" not in per_device["cuda"] or per_device["cuda"] != "available"
