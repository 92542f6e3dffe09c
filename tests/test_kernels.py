"""arm_int4.kernels: the kernel a record names is the one vLLM's log names.

Run: .venv/bin/python -m pytest tests/test_kernels.py -q
The log lines are copied from real vLLM 0.32 runs on this box (bench of a W4A8 tiny Llama,
2026-12-02; `arm-int4 serve default` for the dense case, which logs no kernel line).
"""

import dataclasses

from test_launch import machine

from arm_int4 import kernels, runner

W4A8_LOG = """\
(Worker pid=15822) INFO 12-02 03:23:49 [__init__.py:923] Using Dynamic4bitLinearKernel for mixed-precision linear
(Worker pid=15822) INFO 12-02 03:23:49 [compressed_tensors_w4a8_int.py:105] Using Dynamic4bitLinearKernel for \
CompressedTensorsW4A8Int
"""
DENSE_LOG = """\
[W1202 03:17:27.975204238 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation on the NUMA \
nodes (0). Memory allocations will be strictly bound to these NUMA nodes. (function init_cpu_memory_env)
"""


def test_kernel_names_come_from_the_log():
    assert runner.linear_kernels(W4A8_LOG) == ["Dynamic4bitLinearKernel"]
    assert runner.linear_kernels(DENSE_LOG) == []  # "Using MEMBIND policy for ..." is not a kernel line


def test_labels_say_what_ran_and_where():
    x86 = machine("x86-amd-epyc-this-box", 16)
    arm = dataclasses.replace(machine("graviton4", 64), torch_kleidiai=True)
    ran = runner.linear_kernels(W4A8_LOG)
    assert (
        kernels.describe(ran, x86, "float32") == "Dynamic4bitLinearKernel (x86 reference fallback — slower than BF16)"
    )
    assert kernels.is_x86_fallback(kernels.describe(ran, x86, "float32"))
    assert kernels.describe(ran, arm, "bfloat16") == "Dynamic4bitLinearKernel (KleidiAI)"
    assert not kernels.is_x86_fallback(kernels.describe(ran, arm, "bfloat16"))
    assert kernels.describe([], x86, "bfloat16") is None  # dense: no quantized kernel, no fallback label
    amx = dataclasses.replace(x86, features=x86.features + ("amx_tile",))
    assert kernels.describe(["CPUWNA16LinearKernel"], amx, "bfloat16") == "CPUWNA16LinearKernel (amx ISA)"
    assert kernels.describe(["CPUWNA16LinearKernel"], arm, "bfloat16") == "CPUWNA16LinearKernel (vec ISA)"


X86_LOG = """\
(EngineCore pid=9120) INFO 12-06 02:31:07 [__init__.py:923] Using X86W4A8LinearKernel for mixed-precision linear
(EngineCore pid=9120) INFO 12-06 02:31:07 [compressed_tensors_w4a8_int.py:105] Using X86W4A8LinearKernel for \
CompressedTensorsW4A8Int
"""


def test_arm_int4_x86_kernel_is_named_and_a_split_model_says_so():
    """arm_int4's x86 kernel (x86_w4a8.py) by name; a model some of whose layers it refused (vLLM's
    log then names both kernels) is labelled as partly on the reference fallback."""
    x86 = machine("x86-amd-epyc-this-box", 16)
    ran = runner.linear_kernels(X86_LOG)
    assert ran == ["X86W4A8LinearKernel"]
    label = kernels.describe(ran, x86, "bfloat16")
    assert label == kernels.Kernel.W4A8_X86.display and label.startswith("X86W4A8LinearKernel (arm_int4's x86 kernel")
    assert not kernels.is_x86_fallback(label) and kernels.Kernel.of(label).is_x86
    split = kernels.describe(runner.linear_kernels(X86_LOG + W4A8_LOG), x86, "bfloat16")
    assert split == kernels.Kernel.W4A8_X86_PARTLY.display and kernels.is_x86_fallback(split)
    assert kernels.Kernel.W4A8_X86_PARTLY.class_name == "X86W4A8LinearKernel"
    assert not kernels.Kernel.W4A8_KLEIDIAI.is_x86
