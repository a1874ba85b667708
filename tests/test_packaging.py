# SPDX-License-Identifier: MIT
"""What the installed package is: its build_info, its files, no OpenMP runtime, and the
aarch64 neon kernels checked bit for bit against x86-64 avx2 (under qemu, where available)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sysconfig

import pytest

import cpuadam
from cpuadam import _core

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each architecture's levels, lowest first (DESIGN.md).
LEVELS = {"x86_64": ["baseline", "avx2", "avx512"], "amd64": ["baseline", "avx2", "avx512"],
          "aarch64": ["neon"], "arm64": ["neon"]}


def test_build_info_reports_this_build():
    info = cpuadam.build_info()
    assert info["version"] == cpuadam.__version__ == importlib.metadata.version("cpuadam")
    machine = platform.machine().lower()
    if machine in LEVELS:
        assert info["isa_compiled"] == LEVELS[machine]
    assert info["isa_selected"] in info["isa_supported"]
    assert set(info["isa_supported"]) <= set(info["isa_compiled"])
    assert info["openmp"] == "none"
    assert info["num_threads"] == cpuadam.get_num_threads() >= 1


def test_the_core_uses_no_openmp_runtime():
    # Imported symbols of GNU (GOMP_), LLVM/Intel (__kmpc_) and MSVC (vcomp) OpenMP.
    with open(_core.__file__, "rb") as f:
        data = f.read()
    for marker in (b"GOMP_", b"__kmpc_", b"omp_get_num_threads", b"vcomp"):
        assert marker not in data, marker


def test_the_core_exports_the_thread_count_for_threadpoolctl():
    import ctypes

    core = ctypes.CDLL(_core.__file__)
    before = cpuadam.get_num_threads()
    try:
        assert core.cpuadam_get_num_threads() == before
        assert core.cpuadam_set_num_threads(1) == 1
        assert cpuadam.get_num_threads() == 1
        assert core.cpuadam_set_num_threads(0) == 1  # below one means one, never an error
    finally:
        cpuadam.set_num_threads(before)


def test_the_distribution_carries_the_license():
    files = importlib.metadata.distribution("cpuadam").files or []
    licenses = [f for f in files if os.path.basename(str(f)) == "LICENSE"]
    assert licenses, "no LICENSE among the installed files"
    text = licenses[0].read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the cpuadam authors" in text


@pytest.mark.skipif(os.environ.get("CPUADAM_TEST_INSTALLED") != "1",
                    reason="set CPUADAM_TEST_INSTALLED=1 when testing an installed wheel (.ci/run does)")
def test_the_installed_wheel_is_what_is_tested():
    where = os.path.realpath(cpuadam.__file__)
    assert not where.startswith(os.path.realpath(CHECKOUT) + os.sep), where
    site = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    assert any(where.startswith(s + os.sep) for s in site), where


def missing_aarch64_tools() -> list[str]:
    tools = ["g++", "aarch64-linux-gnu-g++", "qemu-aarch64", "bash"]
    return [t for t in tools if shutil.which(t) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_aarch64_tools()),
                    reason=f"needs {', '.join(missing_aarch64_tools())} (Debian: g++-aarch64-linux-gnu qemu-user)")
@pytest.mark.skipif("avx2" not in cpuadam.build_info()["isa_supported"],
                    reason="the x86-64 side of the comparison needs an AVX2 CPU")
def test_aarch64_neon_kernels_match_x86_avx2_bit_for_bit():
    result = subprocess.run(["bash", os.path.join(CHECKOUT, "tools", "check_aarch64.sh")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "aarch64 neon == x86-64 avx2, bit for bit" in result.stdout
