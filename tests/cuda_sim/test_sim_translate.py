"""tests/cuda_sim/sim_translate.py: the two rewrites of CUDA syntax (launches, dynamic
shared memory), with line numbers kept and comments and strings left alone."""

from __future__ import annotations

import pytest

from sim_translate import translate

pytestmark = pytest.mark.cuda_sim


def body(text: str) -> str:
    return text.split("\n", 1)[1]  # without the #line directive


def test_launches_become_launcher_calls():
    src = ("  kernel<T, A><<<static_cast<unsigned>(B * N), kThreads, smem, stream>>>(p, lay,\n"
           "      tiles);\n"
           "  plain<<<1, 32>>>();\n"
           "  nested<std::pair<int, float>, 3>\n"
           "      <<<dim3(2, 3),\n"
           "         dim3(4)>>>(x);\n")
    out = translate(src, "k.cu")
    assert out.startswith('#line 1 "k.cu"\n')
    lines = body(out).split("\n")
    assert lines[0] == ('  ::sim::launch(kernel<T, A>, "kernel<T, A>", ::sim::LaunchConfig(static_cast<unsigned>(B * N), '
                        'kThreads, smem, stream))(p, lay,')
    assert lines[2] == '  ::sim::launch(plain, "plain", ::sim::LaunchConfig(1, 32))();'
    assert "::sim::launch(nested<std::pair<int, float>, 3>" in body(out)
    assert body(out).count("\n") == src.count("\n")


def test_comments_and_strings_are_left_alone():
    src = ('// a<<<b>>>(c) in a comment\n'
           '/* k<<<1, 1>>>() */ const char* s = "x<<<1,1>>>(y)";\n'
           'k<<<1, 1>>>(0);\n')
    out = body(translate(src, "k.cu"))
    assert out.startswith('// a<<<b>>>(c) in a comment\n/* k<<<1, 1>>>() */ const char* s = "x<<<1,1>>>(y)";\n')
    assert out.endswith('::sim::launch(k, "k", ::sim::LaunchConfig(1, 1))(0);\n')


def test_dynamic_shared_memory_becomes_a_per_block_buffer():
    src = "namespace {\nextern __shared__ __align__(16) unsigned char g_smem[];\n  extern __shared__ float dyn[];\n}\n"
    out = body(translate(src, "k.cu")).split("\n")
    assert out[1] == "#define g_smem (reinterpret_cast<unsigned char*>(::sim::dynamic_smem()))"
    assert out[2] == "#define dyn (reinterpret_cast<float*>(::sim::dynamic_smem()))"


@pytest.mark.parametrize("src,message", [
    ("extern __shared__ float a[], b[];\n", "unsupported extern __shared__"),
    ("k<<<1, 1>>> ;\n", "argument list"),
    ("k<<<1, 1;\n", "without >>>"),
    ("(a + b)<<<1, 1>>>();\n", "kernel name"),
])
def test_unsupported_forms_are_errors(src, message):
    with pytest.raises(ValueError, match=message):
        translate(src, "k.cu")
