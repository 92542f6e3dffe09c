"""The groupwise W4A8 GEMM of arm_int4's x86 kernel: bit-identical to torch's reference kernel.

torch.ops.aten._dyn_quant_matmul_4bit without KleidiAI (what vLLM 0.32 runs on x86 for groupwise W4A8,
int4mm_kernel.cpp `ref_dyn_quant_matmul_4bit_groupwise_kernel`) computes, per output row m, column n:

    acc = 0.0f;  for each group b in order:  acc += (float)Σ_{k∈b} (q[m,k] − zp[m])·w[n,k] · scale[n,b]
    out = clamp(acc · recip[m], ±FLT_MAX)

exact int32 sums per group, then one fp32 multiply and one fp32 add per group, in group order (no fused
multiply-add), then × the activation scale. x86_w4a8_gemm.c does exactly that, with AVX2 integer dot
products (or plain C loops: the same bits), compiled here at first use:

    cc -O3 -march=native -ffp-contract=off -fPIC -shared -fopenmp x86_w4a8_gemm.c

into ~/.cache/arm-int4/x86-w4a8/ (one file per source hash, compiler and CPU flags; `ARM_INT4_HOME`
moves the root), and called through ctypes. With no compiler, or a failed build, `gemm` runs the same
steps in torch (`gemm_torch`, the same bits, slower) and says so once in the log. OpenMP: the library
links libgomp.so.1 by soname, which resolves to the libgomp torch has already loaded, so its threads are
torch's (torch.set_num_threads, vLLM's core binding).

Weights are prepared once (`pack`): two int4 values per byte in the kernel's layout (see the .c file),
per-group weight sums (int16: |Σ| ≤ 8·group) for the zero-point term, group scales in bf16 (the
reference's type): 0.625 bytes per weight at group 32.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "SOURCE",
    "FLAGS",
    "BLOCK_N",
    "MAX_GROUP",
    "pack",
    "unpack",
    "gemm",
    "gemm_torch",
    "gemm_c",
    "library",
    "backend",
]

SOURCE = Path(__file__).with_name("x86_w4a8_gemm.c")
# -ffp-contract=off: one rounding per float step, as the reference; -fopenmp dropped if it fails to build
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
BLOCK_N = 16  # output columns per block of the packed layout: out_features must be a multiple
MAX_GROUP = 4096  # per-group weight sums are stored in int16: |Σ w| ≤ 8·group ≤ 32768
# vLLM's own logger tree: vLLM configures "vllm" (handler, INFO) in every process it starts, ours is not
log = logging.getLogger("vllm.arm_int4.x86_w4a8")


def _cache_dir() -> Path:
    from .models import cache_home  # the project's cache root (ARM_INT4_HOME, as scripts/setup.sh)

    return cache_home() / "x86-w4a8"


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native depends on them: a home directory can be shared by machines)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(cc: str) -> tuple[Path, str]:
    """-> (shared library, its description), compiled once per key; raises on failure."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    src = SOURCE.read_bytes()
    for extra in (("-fopenmp",), ()):
        flags = FLAGS + extra
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(), _cpu_flags().encode()]))
        out = _cache_dir() / f"x86_w4a8_gemm-{key.hexdigest()[:16]}.so"
        desc = f"{cc} {' '.join(flags)} ({version})"
        if out.exists():
            return out, desc
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        p = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if p.returncode == 0:
            os.replace(tmp, out)  # atomic: several vLLM processes may build at once
            return out, desc
        os.unlink(tmp)
        err = p.stderr.strip()[-500:]
    raise RuntimeError(f"{cc} failed: {err}")


_lib: list = []  # [ctypes library or None, description]


def library():
    """The compiled kernel (ctypes CDLL) or None, and a line saying which path runs; built on first call."""
    if not _lib:
        lib, desc = None, ""
        cc = os.environ.get("CC", "cc")
        if platform.machine() not in ("x86_64", "AMD64"):
            desc = "torch steps (x86_64 only for the C kernel)"
        elif os.environ.get("ARM_INT4_X86_W4A8_C") == "0":
            desc = "torch steps (ARM_INT4_X86_W4A8_C=0)"
        elif shutil.which(cc) is None:
            desc = f"torch steps (no C compiler: {cc} not found)"
        else:
            try:
                path, how = _build(cc)
                lib = ctypes.CDLL(str(path))
                lib.x86_w4a8_gemm.restype = None
                lib.x86_w4a8_gemm.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 7 + [ctypes.c_int]
                simd = "AVX2" if lib.x86_w4a8_simd() else "plain C"
                desc = f"C kernel, {simd} ({how}; {path})"
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                lib, desc = None, f"torch steps (the C kernel did not build: {exc!s:.300})"
        (log.info if lib is not None else log.warning)("groupwise GEMM: %s", desc)
        _lib.extend([lib, desc])
    return _lib[0], _lib[1]


def backend() -> str:
    """Which path runs the groupwise GEMM here, one line."""
    return library()[1]


def pack(w, scales):
    """w int8 [N, K] (-8..7), scales bf16 [N, K/g] (the reference's groupwise scale type) ->
    (wp uint8 [N·K/2], wsum int16 [N/16, K/g, 16], sc bf16 [N/16, K/g, 16])."""
    import torch

    n, k = w.shape
    groups = scales.shape[1]
    u = (w.to(torch.int16) + 8).to(torch.uint8).view(n // BLOCK_N, 2, 8, k // 8, 2, 4)  # nb, h, c, o, t, j
    byte = u[..., 0, :] | (u[..., 1, :] << 4)  # nb, h, c, o, j
    wp = byte.permute(0, 3, 1, 2, 4).contiguous().view(-1)  # nb, o, h, c, j
    wsum = w.view(n, groups, k // groups).sum(-1, dtype=torch.int32).to(torch.int16)
    blocks = lambda t: t.view(n // BLOCK_N, BLOCK_N, groups).permute(0, 2, 1).contiguous()
    return wp, blocks(wsum), blocks(scales.to(torch.bfloat16))


def unpack(wp, n: int, k: int):
    """pack's wp -> int8 [N, K] (-8..7)."""
    import torch

    byte = wp.view(n // BLOCK_N, k // 8, 2, 8, 4).permute(0, 2, 3, 1, 4)  # nb, h, c, o, j
    lo, hi = (byte & 0x0F).to(torch.int8) - 8, (byte >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-2).reshape(n, k)


def gemm_torch(q, zp, recip, wp, wsum, sc):
    """The reference's steps in torch (eager): the same bits as the C kernel, for when it cannot build."""
    import torch

    m, k = q.shape
    nb, groups, bn = sc.shape
    n, g = nb * bn, k // groups
    w = unpack(wp, n, k).double().view(n, groups, g)
    a = (q.int() - zp).double().view(m, groups, g)  # |q − zp| ≤ 255
    s = sc.permute(0, 2, 1).reshape(n, groups).float()
    acc = torch.zeros(m, n, dtype=torch.float32)
    for b in range(groups):
        # exact: integer products and sums far below 2^53 in float64, and |Σ| ≤ 255·8·g < 2^24 in fp32
        iacc = (a[:, b] @ w[:, b].t()).float()
        acc = acc + iacc * s[:, b]  # two fp32 roundings, as the reference (two eager kernels: no fusion)
    return (acc * recip).clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)


def gemm_c(q, zp, recip, wp, wsum, sc, simd: bool = True):
    """The compiled kernel (requires library() to have built it); simd=False runs its plain C loops."""
    import torch

    lib = library()[0]
    m, k = q.shape
    nb, groups, bn = sc.shape
    out = torch.empty(m, nb * bn, dtype=torch.float32)
    q, zp, recip = q.contiguous(), zp.contiguous(), recip.contiguous()
    lib.x86_w4a8_gemm(
        m,
        nb * bn,
        k,
        k // groups,
        q.data_ptr(),
        zp.data_ptr(),
        recip.data_ptr(),
        wp.data_ptr(),
        wsum.data_ptr(),
        sc.data_ptr(),
        out.data_ptr(),
        int(simd),
    )
    return out


def gemm(q, zp, recip, wp, wsum, sc):
    """q int8 [M, K], zp int32 [M, 1], recip fp32 [M, 1], pack's (wp, wsum, sc) -> fp32 [M, N]: the
    reference's output before bias. The C kernel where it built, else the torch steps."""
    if library()[0] is not None:
        return gemm_c(q, zp, recip, wp, wsum, sc)
    return gemm_torch(q, zp, recip, wp, wsum, sc)
