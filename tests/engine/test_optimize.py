"""rexfast.optimize and the precision mode: BatchNorm folding is exact, the given model is
untouched, bf16 agrees with fp32 within stated tolerances, ``auto`` resolves from the CPU's
bf16 support, bf16 runs every op on its C++ kernel with no conversions between layers,
and the CLI flags fail in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rexfast
from rexfast.engine import precision as precision_mod
from rexfast.engine.optimize import optimize
from rexfast.models import CGFormer, CGFormerConfig, ReLA, ReLAConfig
from rexfast.models.backbones.resnet import ResNetConfig
from rexfast.models.layers import ConvNormAct, FrozenBatchNorm2d, fold_batchnorm


def _inputs(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    ids = torch.randint(1000, 2000, (b, 20), generator=g)
    mask = torch.ones(b, 20, dtype=torch.long)
    mask[:, 12:] = 0
    return images, ids, mask


def _randomise_norms(model):
    """BatchNorm statistics and affine terms away from identity, so folding has work to do."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def _rela_r50_tiny():
    return ReLAConfig.tiny(backbone="resnet", swin=None, resnet=ResNetConfig(stem_channels=8, res2_channels=32))


MODELS = {
    "cgformer": lambda: CGFormer(CGFormerConfig.tiny()),
    "rela_swin": lambda: ReLA(ReLAConfig.tiny()),
    "rela_r50": lambda: ReLA(_rela_r50_tiny()),
}


def _logits(model, images, ids, mask):
    out = model.inference_outputs(images, ids, mask)
    return out["logits" if "logits" in out else "mask_logits"].float()


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {name: _randomise_norms(make().eval()) for name, make in MODELS.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_optimize_is_exact(built, name):
    """BatchNorm folding (float64 arithmetic), channels-last and the fused ops: fp32 logits ≤ 1e-5."""
    model = built[name]
    images, ids, mask = _inputs()
    opt = optimize(model, precision="fp32")
    expected = {"cgformer": 8, "rela_swin": 0, "rela_r50": 53}[name]  # Fusion 6 + mask head 2; ResNet-50 53
    assert opt.optimization.folded_batchnorms == expected
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in opt.modules())
    with torch.no_grad():
        assert _rel(_logits(opt, images, ids, mask), _logits(model, images, ids, mask)) <= 1e-5


def test_fold_batchnorm_in_a_sequential_and_a_conv_norm_act():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              ConvNormAct(8, 8, 1, bias=False, norm=FrozenBatchNorm2d(8)),
                              torch.nn.Conv2d(8, 4, 1))
    _randomise_norms(net).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = net(x)
        assert fold_batchnorm(net) == 2
        assert isinstance(net[1], torch.nn.Identity) and net[3].norm is None and net[3].bias is not None
        assert _rel(net(x), ref) <= 1e-6


@pytest.mark.parametrize("name", list(MODELS))
def test_optimize_leaves_the_given_model_unchanged(built, name):
    model = built[name].train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        grads = {k: p.requires_grad for k, p in model.named_parameters()}
        config = model.config
        opt = optimize(model, precision="bf16")
        assert opt is not model and opt.training is False
        assert model.training is True and model.config == config
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
        assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
        assert model.input_dtype is None and model.input_memory_format is None
        assert all(p.is_contiguous() for p in model.parameters())
    finally:
        model.eval()


# (max logits relative error, min mask agreement). Tiny random-weight models are the worst case:
# no training has spread the logits away from the decision boundary, and in ReLA the region
# masks' sigmoid < 0.5 decisions flip under rounding. Measured here: CGFormer 0.005 / 100%,
# ReLA Swin 0.068 / 99.1%, ReLA R50 0.074 / 99.2% (full size: benchmarks/README.md).
BF16_TOLERANCE = {"cgformer": (0.02, 0.995), "rela_swin": (0.12, 0.98), "rela_r50": (0.12, 0.98)}


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_agrees_with_fp32(built, name):
    model = built[name]
    images, ids, mask = _inputs()
    opt = optimize(model, precision="bf16")
    assert opt.optimization.precision == "bf16"
    assert next(opt.backbone.parameters()).dtype == torch.bfloat16
    islands = opt.optimization.fp32_modules
    if name.startswith("rela"):  # the deformable pixel decoder runs bf16 too (float32 accumulation)
        assert all(p.dtype == torch.bfloat16 for p in opt.sem_seg_head.pixel_decoder.parameters())
    # a Swin backbone keeps its four pixel-word attentions float32; ResNet-50 has none
    attentions = [n for n in islands if n.endswith(".image_lang_att")]
    assert len(attentions) == (0 if name == "rela_r50" else 4)
    assert all(p.dtype == torch.float32 for n in attentions for p in opt.get_submodule(n).parameters())
    assert len(islands) == len(attentions)
    for island in islands:  # their float32 weights unrounded, not bf16 values cast back up
        original = dict(model.get_submodule(island).named_parameters())
        for key, p in opt.get_submodule(island).named_parameters():
            assert p.dtype == torch.float32 and torch.equal(p, original[key]), f"{island}.{key}"
    with torch.no_grad():
        rel = _rel(_logits(opt, images, ids, mask), _logits(model, images, ids, mask))
        ref, got = model.predict(images, ids, mask), opt.predict(images, ids, mask)
    agree = float(((ref.mask > 0.5) == (got.mask > 0.5)).float().mean())
    max_rel, min_agree = BF16_TOLERANCE[name]
    assert got.mask.dtype == torch.float32 and got.mask.shape == ref.mask.shape
    assert rel <= max_rel, f"bf16 logits relative error {rel:.3g}"
    assert agree >= min_agree, f"bf16 mask agreement {agree:.4f}"


def test_precision_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_bf16_support", lambda: "AMX-BF16")
    assert precision_mod.resolve_precision("auto", "cpu") == "bf16"
    assert "AMX-BF16" in precision_mod.describe("auto", "cpu")
    monkeypatch.setattr(precision_mod, "cpu_bf16_support", lambda: "AVX512-BF16")
    assert precision_mod.resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(precision_mod, "cpu_bf16_support", lambda: None)
    assert precision_mod.resolve_precision("auto", "cpu") == "fp32"
    assert "no native bf16" in precision_mod.describe("auto", "cpu")
    assert precision_mod.resolve_precision("bf16", "cpu") == "bf16"  # explicit wins, native or not
    assert precision_mod.resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(precision_mod, "cpu_bf16_support", lambda: "AMX-BF16")
    assert precision_mod.resolve_precision("auto", "cuda") == "fp32"  # a GPU keeps its AMP setting
    assert precision_mod.resolve_precision("bf16", "cuda") == "bf16"


def test_cpu_bf16_support_reads_torch():
    expected = ("AMX-BF16" if torch.cpu._is_amx_tile_supported() else
                "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else None)
    assert precision_mod.cpu_bf16_support() == expected
    assert rexfast.info()["cpu_native_bf16"] == (expected or "none")


def test_training_precision_picks_the_cpu_autocast(monkeypatch):
    from rexfast.engine.trainer import amp_dtype_of

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype_of("auto", cpu, "fp32") is None
    assert amp_dtype_of("auto", cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(precision_mod, "cpu_bf16_support", lambda: None)
    assert amp_dtype_of("auto", cpu, "auto") is None
    monkeypatch.setattr(precision_mod, "cpu_bf16_support", lambda: "AVX512-BF16")
    assert amp_dtype_of("auto", cpu, "auto") is torch.bfloat16
    assert amp_dtype_of("off", cpu, "bf16") is None  # an explicit train.amp wins
    assert amp_dtype_of("auto", cuda, "fp32") is torch.bfloat16  # the GPU's AMP setting stays
    with pytest.raises(ValueError, match="train.precision"):
        amp_dtype_of("auto", cpu, "fp16")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(precision="fp16"), ValueError, "precision must be one of"),
    (dict(precision=None), ValueError, "precision must be one of"),
    (dict(compile="yes"), TypeError, "compile must be True or False"),
    (dict(channels_last=1), TypeError, "channels_last must be True or False"),
])
def test_optimize_argument_errors(built, kwargs, error, match):
    with pytest.raises(error, match=match):
        optimize(built["cgformer"], **kwargs)


def test_optimize_refuses_what_is_not_a_rexfast_model():
    with pytest.raises(TypeError, match="model must be a rexfast model"):
        optimize(torch.nn.Linear(2, 2))


def _subtree(event):
    stack, out = list(event.cpu_children), []
    while stack:
        e = stack.pop()
        out.append(e)
        stack.extend(e.cpu_children)
    return out


def test_bf16_runs_every_op_on_its_cpu_kernel_without_conversions_between_layers(built):
    """bf16 inputs reach the C++ kernels (no reference fallback), and the optimized model
    converts an order of magnitude fewer tensors than autocast of the same model does."""
    from torch.profiler import profile

    images, ids, mask = _inputs(b=1)
    kernels = {"cgformer": {"rexfast_C::group_assign_fwd"},
               "rela_swin": {"rexfast_C::ms_deform_attn_fwd", "rexfast_C::region_image_attention_fwd",
                             "rexfast_C::region_language_attention_fwd"}}
    for name, wanted in kernels.items():
        model = built[name]
        opt = optimize(model, precision="bf16")
        with torch.no_grad():
            opt.predict(images, ids, mask)  # one-time checks happen here
            with profile(record_shapes=True) as prof:
                opt.predict(images, ids, mask)
            with profile() as auto:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model.predict(images, ids, mask)
        events = prof.events()
        names = {e.name for e in events}
        assert wanted <= names, f"{name}: kernels missing {wanted - names}"
        assert not any(n.startswith("rexfast::") and "reference" in n for n in names)
        for e in events:
            if e.name == "rexfast::group_assign":
                # only the (B, N, C) queries and the temperature are read in float32: k, v are read as bf16
                converted = [c.input_shapes[0] for c in _subtree(e) if c.name == "aten::_to_copy"]
                assert all(len(s) <= 1 or s[1] == model.config.num_tokens for s in converted), converted
            if e.name == "rexfast::ms_deform_attn":  # bf16 values, locations and weights read as they are
                assert not [c for c in _subtree(e) if c.name == "aten::_to_copy"]
        big = lambda evs: sum(1 for e in evs if e.name == "aten::_to_copy")  # noqa: E731
        assert big(events) * 2 < big(auto.events()), (big(events), big(auto.events()))


def test_bf16_linear_layers_add_their_bias_inside_the_matmul(built):
    """Every plain bf16 nn.Linear with a bias runs one oneDNN matmul with the bias applied in it:
    no addmm and so no copy of the broadcast bias into the output first; the same numbers as
    F.linear; F.linear wherever that kernel does not apply (float32 islands, autograd)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rexfast.models.layers import _ONEDNN_LINEAR, BiasInMatmulLinear

    if not _ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    model = built["rela_swin"]
    opt = optimize(model, precision="bf16")
    swapped = [m for m in opt.modules() if isinstance(m, BiasInMatmulLinear)]
    plain = [m for m in model.modules() if type(m) is torch.nn.Linear and m.bias is not None]
    assert len(swapped) == len(plain) > 0
    assert opt.state_dict().keys() == model.state_dict().keys()
    assert not any(isinstance(m, BiasInMatmulLinear) for m in optimize(model, precision="fp32").modules())
    assert not any(isinstance(m, BiasInMatmulLinear) for m in model.modules())  # the original is untouched
    g = torch.Generator().manual_seed(3)
    for layer in swapped[:8]:
        x = torch.randn(2, 37, layer.in_features, generator=g).to(layer.weight.dtype)
        with torch.no_grad():
            want = torch.nn.functional.linear(x, layer.weight, layer.bias)
            assert torch.equal(layer(x), want)
    layer = swapped[0]
    x = torch.randn(5, layer.in_features, generator=g, dtype=layer.weight.dtype, requires_grad=True)
    layer(x).sum().backward()  # with autograd: F.linear, differentiable
    assert x.grad is not None and x.grad.shape == x.shape
    class Matmuls(TorchDispatchMode):  # which matmul kernels run, on which dtype
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = args[0] if args else None
            self.seen.append((str(func.overloadpacket), first.dtype if isinstance(first, torch.Tensor) else None))
            return func(*args, **(kwargs or {}))

    images, ids, mask = _inputs(b=1)
    with torch.no_grad(), Matmuls() as mode:
        opt.predict(images, ids, mask)
    assert ("mkldnn._linear_pointwise", torch.bfloat16) in mode.seen
    assert ("aten.addmm", torch.bfloat16) not in mode.seen  # the float32 islands' may remain


def test_import_rexfast_optimize_stays_light():
    code = ("import sys, rexfast; rexfast.optimize; "
            "bad = [m for m in ('triton', 'transformers', 'torch._dynamo') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"rexfast.optimize imported {proc.stdout.strip()} {proc.stderr[-500:]}"


@pytest.mark.parametrize("argv", [
    ["predict", "--checkpoint", "x", "--image", "y", "--text", "z", "--precision", "fp16"],
    ["eval", "--checkpoint", "x", "--precision", "half"],
    ["demo", "--precision", "int8"],
    ["train", "--precision", "bf32"],
])
def test_cli_precision_errors_are_one_line(argv):
    proc = subprocess.run([sys.executable, "-m", "rexfast", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexfast: error:") and "--precision" in lines[0], proc.stderr
