"""Facts about the machine that choose defaults (precision) in training and generation."""

from pathlib import Path


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16), where bf16 kernels beat
    fp32 ones; elsewhere bf16 is emulated and slower."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
