"""The machine line every published timing and every run's start line carry."""

import os
import sys

import pytest

from trainer.machine import cpu_description


INFO = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""


@pytest.mark.skipif("model name" not in INFO or "\nflags" not in INFO, reason="an x86 /proc/cpuinfo")
def test_cpu_description_names_the_model_the_cores_and_amx():
    info = INFO
    model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
    line = cpu_description()
    assert line.startswith(model + ", ")
    assert f", {len(os.sched_getaffinity(0))} cores, " in line
    assert line.endswith(", AMX" if "amx_tile" in flags else ", no AMX")
