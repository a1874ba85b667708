# SPDX-License-Identifier: MIT
"""Who controls the core's threads: set_num_threads and its bounds, CPUADAM_NUM_THREADS,
threadpoolctl, and a process forked after a multithreaded step."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest

import cpuadam
from cpuadam import _core

# Large enough for the core to give two threads a slice each (16384 elements per thread).
LARGE = 100_003
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.02, decoupled=True,
             decay_mode="lr", eps_mode="torch", grad_scale=1.0, amsgrad=False, maximize=False)
# How long a forked child may take before it counts as hung (it needs well under a second).
CHILD_TIMEOUT_S = 60


@pytest.fixture
def threads():
    """Sets the core's thread count; restores the previous one afterwards."""
    before = cpuadam.get_num_threads()
    yield cpuadam.set_num_threads
    cpuadam.set_num_threads(before)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def bound() -> int:
    """The documented cap on the thread count: 4 per available CPU, at most 1024."""
    return min(4 * available_cpus(), 1024)


def buffers(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": [rng.standard_normal(LARGE).astype(np.float32)],
            "grads": [rng.standard_normal(LARGE).astype(np.float32)],
            "exp_avgs": [np.zeros(LARGE, np.float32)],
            "exp_avg_sqs": [np.zeros(LARGE, np.float32)]}


def stepped_bytes(seed: int, steps: int = 3) -> bytes:
    bufs = buffers(seed)
    for t in range(1, steps + 1):
        _core.adam_step([dict(bufs, step=t, **HYPER)])
    return b"".join(bufs[k][0].tobytes() for k in ("params", "exp_avgs", "exp_avg_sqs"))


def child_steps(conn, seed: int) -> None:
    """Runs in the forked child: two threads, the same steps as the parent."""
    cpuadam.set_num_threads(2)
    conn.send(stepped_bytes(seed))
    conn.close()


# Python 3.12+ warns when a process with several threads forks; forking is what is tested.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_a_child_forked_after_a_two_thread_step_steps_normally(threads):
    threads(2)
    parent_result = stepped_bytes(seed=7)  # starts the pool's worker in the parent
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=child_steps, args=(send, 7))
    child.start()
    send.close()
    try:
        assert receive.poll(CHILD_TIMEOUT_S), "the forked child hung in its first parallel step"
        child_result = receive.recv()
    finally:
        child.join(CHILD_TIMEOUT_S)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
    assert child_result == parent_result
    # And the parent's own pool still works after the fork.
    assert stepped_bytes(seed=7) == parent_result


def test_set_num_threads_clamps_a_huge_request_to_the_bound(threads):
    threads(10**6)
    assert cpuadam.get_num_threads() == bound()
    assert cpuadam.build_info()["num_threads"] == bound()
    threads(1)
    single = stepped_bytes(seed=3)
    threads(10**6)
    assert stepped_bytes(seed=3) == single


@pytest.mark.parametrize("n", [0, -1, -(2**31)])
def test_set_num_threads_below_one_is_a_value_error(threads, n):
    before = cpuadam.get_num_threads()
    with pytest.raises(ValueError, match=f"set_num_threads: n must be >= 1, got {n}"):
        threads(n)
    assert cpuadam.get_num_threads() == before


@pytest.mark.parametrize("n", ["2", 2.0, None, 10**20], ids=["str", "float", "none", "beyond_int"])
def test_set_num_threads_refuses_non_int_and_out_of_range_values(threads, n):
    before = cpuadam.get_num_threads()
    with pytest.raises(TypeError):
        threads(n)
    assert cpuadam.get_num_threads() == before


def default_threads(env_updates: dict) -> subprocess.CompletedProcess:
    """Imports cpuadam in a fresh interpreter with the given environment changes."""
    env = {k: v for k, v in os.environ.items() if k not in ("CPUADAM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_updates)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cpuadam.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    code = "import json, cpuadam; print(json.dumps(cpuadam.get_num_threads()))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("env, expected", [
    ({}, "cpus"),
    ({"OMP_NUM_THREADS": "1"}, "cpus"),  # a launcher's setting for torch's pool, not ours
    ({"CPUADAM_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}, 3),
    ({"CPUADAM_NUM_THREADS": "1000000"}, "bound"),
], ids=["default", "omp_num_threads_ignored", "cpuadam_num_threads", "env_clamped"])
def test_default_thread_count_comes_from_cpuadam_num_threads_else_the_affinity_mask(env, expected):
    result = default_threads(env)
    assert result.returncode == 0, result.stderr
    want = {"cpus": min(available_cpus(), bound()), "bound": bound()}.get(expected, expected)
    assert json.loads(result.stdout) == want


@pytest.mark.parametrize("value", ["0", "-2", "two", "2x"])
def test_a_malformed_cpuadam_num_threads_fails_the_import_with_its_value(value):
    result = default_threads({"CPUADAM_NUM_THREADS": value})
    assert result.returncode != 0
    assert f"ImportError: CPUADAM_NUM_THREADS={value} is not a positive integer" in result.stderr


def cpuadam_pools(threadpoolctl) -> list[dict]:
    return [i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "cpuadam"]


def test_threadpoolctl_lists_the_pool_as_openmp():
    threadpoolctl = pytest.importorskip("threadpoolctl", minversion="3.5")
    (info,) = cpuadam_pools(threadpoolctl)
    assert info["user_api"] == "openmp"
    assert info["version"] == cpuadam.__version__
    assert os.path.realpath(info["filepath"]) == os.path.realpath(_core.__file__)
    assert info["num_threads"] == cpuadam.get_num_threads()


@pytest.mark.parametrize("user_api", [None, "openmp"])
def test_threadpool_limits_applies_to_the_pool_and_is_undone(threads, user_api):
    threadpoolctl = pytest.importorskip("threadpoolctl", minversion="3.5")
    threads(2)
    with threadpoolctl.threadpool_limits(1, user_api=user_api):
        assert cpuadam.get_num_threads() == 1
        assert cpuadam_pools(threadpoolctl)[0]["num_threads"] == 1
    assert cpuadam.get_num_threads() == 2


def test_threadpool_limits_for_blas_leaves_the_pool_alone(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl", minversion="3.5")
    threads(2)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        assert cpuadam.get_num_threads() == 2


def test_a_threadpoolctl_limit_above_the_bound_is_clamped(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl", minversion="3.5")
    threads(1)
    controller = threadpoolctl.ThreadpoolController().select(internal_api="cpuadam")
    with controller.limit(limits=10**6):
        assert cpuadam.get_num_threads() == bound()
    assert cpuadam.get_num_threads() == 1
