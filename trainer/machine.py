"""The machine a number comes from, in the words every published timing uses: the CPU's model name (as
lscpu prints it), its cores and whether it has AMX tiles (what makes bf16 autocast fast on a CPU)."""

from __future__ import annotations

import functools
import os
import platform


@functools.cache
def cpu_description() -> str:
    """E.g. ``AMD EPYC, 2 cores, AVX-512 BF16, no AMX`` (``/proc/cpuinfo``; elsewhere the platform's name)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in (platform.processor(), platform.machine()):
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [name, f"{cores} cores"]
    if flags:
        parts.append("AVX-512 BF16" if "avx512_bf16" in flags else ("AVX-512" if "avx512f" in flags else "no AVX-512"))
        parts.append("AMX" if "amx_tile" in flags else "no AMX")
    return ", ".join(parts)
