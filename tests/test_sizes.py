# SPDX-License-Identifier: MIT
"""Sizes past 32-bit byte counts: a real step over a 2 GiB buffer, and the thread partition up to 2**62 elements."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from reference import adam_step as reference_adam_step

from cpuadam import _core

EPS32 = float(np.finfo(np.float32).eps)
HERE = os.path.dirname(os.path.abspath(__file__))


def test_partition_slices_cover_up_to_2_to_the_62_exactly_once_in_order(tmp_path):
    # cpp/partition.h is header-only: tests/cpp/test_partition.cpp includes it
    # and checks the slicing (.ci/sanitize also runs it under ASan and UBSan).
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build tests/cpp/test_partition.cpp")
    exe = tmp_path / "test_partition"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-ftrapv", "-o", str(exe),
                            os.path.join(HERE, "cpp", "test_partition.cpp")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("ok\n")


# One float32 param of 2**29 + 17 elements: 2 GiB and 68 bytes per buffer, so
# byte offsets pass 2**31 and the last 17 elements sit past the round size.
BIG = 2**29 + 17


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CPUADAM_SLOW") != "1",
                    reason="8.6 GB and about two minutes: run by .ci/slow (CPUADAM_SLOW=1)")
def test_a_step_over_a_buffer_larger_than_2_gib_matches_the_reference_on_a_sample():
    rng = np.random.default_rng(29)
    param = np.empty(BIG, np.float32)
    grad = np.empty(BIG, np.float32)
    # Cheap, position-dependent values: element i's value is known without a copy.
    param[:] = np.float32(0.5)
    param[::7] = np.float32(-1.25)
    grad[:] = np.float32(0.25)
    grad[::3] = np.float32(-2.0)
    exp_avg = np.zeros(BIG, np.float32)
    exp_avg_sq = np.zeros(BIG, np.float32)
    sample = np.unique(np.concatenate([rng.integers(0, BIG, 4096), np.arange(BIG - 64, BIG),
                                       np.arange(2**29 - 16, 2**29 + 16), np.arange(0, 64)]))
    p64 = param[sample].astype(np.float64)
    g64 = grad[sample].astype(np.float64)
    state = {}
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True)
    _core.adam_step([dict(params=[param], grads=[grad], exp_avgs=[exp_avg], exp_avg_sqs=[exp_avg_sq],
                          step=1, **hyper)])
    reference_adam_step(p64, g64, state, step=1, **hyper)
    err = np.abs(param[sample].astype(np.float64) - p64)
    assert (err <= 4 * EPS32 * (np.abs(p64) + hyper["lr"])).all()
    assert (np.abs(exp_avg[sample] - state["exp_avg"]) <= 4 * EPS32 * np.abs(g64)).all()
    assert (np.abs(exp_avg_sq[sample] - state["exp_avg_sq"]) <= 4 * EPS32 * g64 * g64).all()
