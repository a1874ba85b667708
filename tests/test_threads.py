# SPDX-License-Identifier: MIT
"""Bitwise identical results for any thread count, and for many small tensors vs one large."""

from __future__ import annotations

import numpy as np
import pytest

import cpuadam
from cpuadam import _core

# The core gives each thread at least 16384 elements, so these sizes are
# large enough that two and three threads really run (and three, on a
# two-core machine, oversubscribes).
LARGE = 200_003
THREAD_COUNTS = (1, 2, 3)
STEPS = 3
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.02, decoupled=True,
             decay_mode="lr", eps_mode="torch", grad_scale=0.7, amsgrad=True, maximize=False)
BUFFERS = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


@pytest.fixture
def threads():
    """Sets the core's thread count; restores the previous one afterwards."""
    before = cpuadam.get_num_threads()
    yield cpuadam.set_num_threads
    cpuadam.set_num_threads(before)


def fresh(sizes, rng):
    """Params, a non-zero state and STEPS sets of grads for tensors of the given sizes."""
    data = {
        "params": [rng.standard_normal(n).astype(np.float32) for n in sizes],
        "exp_avgs": [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in sizes],
        "exp_avg_sqs": [(0.1 * rng.standard_normal(n)).astype(np.float32) ** 2 for n in sizes],
        "grads": [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(STEPS)],
    }
    data["max_exp_avg_sqs"] = [v * np.float32(2) for v in data["exp_avg_sqs"]]
    return data


def run(data, hyper=HYPER) -> dict[str, bytes]:
    """Steps copies of data's buffers; returns each buffer list's bytes, concatenated."""
    bufs = {k: [a.copy() for a in data[k]] for k in BUFFERS}
    for t, grads in enumerate(data["grads"], start=1):
        _core.adam_step([dict(bufs, grads=grads, step=t, **hyper)])
    return {k: b"".join(a.view(np.uint32).tobytes() for a in bufs[k]) for k in BUFFERS}


def test_set_num_threads_is_reported_back(threads):
    for n in THREAD_COUNTS:
        threads(n)
        assert cpuadam.get_num_threads() == n
        assert cpuadam.build_info()["num_threads"] == n


@pytest.mark.parametrize("hyper", [HYPER, dict(HYPER, amsgrad=False, decoupled=False, maximize=True,
                                                eps_mode="keras")],
                         ids=["adamw_amsgrad", "adam_l2_maximize_keras"])
def test_one_large_tensor_gives_identical_bytes_for_any_thread_count(threads, rng, hyper):
    data = fresh([LARGE], rng)
    results = {}
    for n in THREAD_COUNTS:
        threads(n)
        results[n] = run(data, hyper)
    for n in THREAD_COUNTS[1:]:
        for key in BUFFERS:
            assert results[n][key] == results[1][key], f"{key} differs between 1 and {n} threads"


def test_many_tensors_crossing_slice_boundaries_give_identical_bytes_for_any_thread_count(threads, rng):
    # Sizes not multiples of anything, so thread slices start and end inside tensors.
    sizes = [int(n) for n in rng.integers(0, 5000, 90)] + [LARGE // 3]
    data = fresh(sizes, rng)
    results = {}
    for n in THREAD_COUNTS:
        threads(n)
        results[n] = run(data)
    for n in THREAD_COUNTS[1:]:
        for key in BUFFERS:
            assert results[n][key] == results[1][key], f"{key} differs between 1 and {n} threads"


@pytest.mark.parametrize("num_threads", THREAD_COUNTS, ids=lambda n: f"threads={n}")
def test_many_small_tensors_match_one_concatenated_tensor_bitwise(threads, rng, num_threads):
    threads(num_threads)
    sizes = [int(n) for n in rng.integers(0, 300, 1500)]
    pieces = fresh(sizes, rng)
    whole = {k: [np.concatenate(pieces[k])] for k in BUFFERS}
    whole["grads"] = [[np.concatenate(g)] for g in pieces["grads"]]
    assert run(pieces) == run(whole)
