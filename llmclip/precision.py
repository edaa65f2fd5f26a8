"""Which precision a job runs in: the hardware decides ``auto`` (bf16 on CUDA; on a CPU, bf16 autocast
where it has bf16 matrix instructions, else fp32)."""

from __future__ import annotations

import functools


@functools.cache
def cpu_bf16_matmul() -> str | None:
    """The CPU's bf16 matrix instructions, from /proc/cpuinfo: ``amx_bf16`` (Intel AMX tiles),
    ``avx512_bf16`` (bf16 dot products, e.g. AMD Zen 4), or None (bf16 emulated).

    Measured, one core, SmolLM2's shapes: with AMX a bf16 matmul ran at 1.57 TFLOP/s against 0.17
    for fp32; with AVX512-BF16 (an AMD EPYC) at 2.3x fp32, and the stage-1 step 1.5x faster under
    bf16 autocast; CPUs with neither emulate bf16 several times slower than fp32. Every rank of a
    homogeneous node reads the same flags, so every rank decides the same.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return bf16_matmul_flag(fh.read())
    except OSError:
        return None


def bf16_matmul_flag(cpuinfo: str) -> str | None:
    """``amx_bf16``, ``avx512_bf16`` or None from the text of /proc/cpuinfo (its first flags line)."""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def resolve_precision(precision: str, cuda: bool, autocast_ok: bool = True) -> str:
    """The precision a run uses: ``bf16`` (bf16 weights, DeepSpeed bf16), ``fp32``, or
    ``bf16-autocast`` (fp32 weights and optimizer, matmuls in bf16 under ``torch.autocast``).
    ``autocast_ok=False`` for the jobs without an autocast path (stage 2, cache, eval): CPU = fp32."""
    if precision != "auto":
        return precision
    if cuda:
        return "bf16"
    return "bf16-autocast" if autocast_ok and cpu_bf16_matmul() else "fp32"
