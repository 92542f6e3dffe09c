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
