# SPDX-License-Identifier: MIT
"""Memory the core must not touch or lose: borders of sliced buffers, buffers resized mid-call, step buffers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_boundary import core_batches, snapshot_bytes
from test_isa import child_env

from cpuadam import _core

# --------------------------------------------------------------------------
# A buffer resized by another thread while the core runs without the GIL.
# NumPy's ndarray.resize(refcheck=False) reallocates an array that owns its
# data whatever views or buffer exports exist; the core must hold every array
# of a call (or the array owning its memory) so that resize raises instead.

# Runs in a child process, so that a use-after-free is a failed test and not
# a dead interpreter. The hammer thread tries to resize one buffer only while
# the main thread is inside a core call; it sleeps between tries so that the
# main thread never waits for the GIL, and a long switch interval keeps the
# hammer from being scheduled in the few bytecodes around the call.
HAMMER_CHILD = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    from cpuadam import _core

    sys.setswitchinterval(1.0)
    case, n, steps = sys.argv[1], int(sys.argv[2]), 3
    rng = np.random.default_rng(5)

    def buffers():
        return {
            "param": rng.standard_normal(n).astype(np.float32),
            "grad": rng.standard_normal(n).astype(np.float32),
            "exp_avg": np.zeros(n, np.float32),
            "exp_avg_sq": np.zeros(n, np.float32),
        }

    def call(b):
        hyper = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                     decoupled=True)
        if case == "sgd_momentum_buffer":
            _core.sgd_step([dict(params=[b["param"]], grads=[b["grad"]], momentum_buffers=[b["exp_avg"]],
                                 lr=1e-2, weight_decay=0.0, momentum=0.9)])
        elif case == "accumulate_grad_accum":
            _core.accumulate([dict(grads=[b["grad"]], grad_accums=[b["exp_avg"]])])
        else:
            _core.adam_step([dict(params=[b["param"]], grads=[b["grad"]], exp_avgs=[b["exp_avg"]],
                                  exp_avg_sqs=[b["exp_avg_sq"]], **hyper)])

    def target(b):
        # The array the hammer resizes: a buffer, or the array a view was cut from.
        if case == "param_view_base":
            return b["param_base"]
        return b[{"adam_grad": "grad", "adam_exp_avg_sq": "exp_avg_sq", "sgd_momentum_buffer": "exp_avg",
                  "accumulate_grad_accum": "exp_avg"}.get(case, "param")]

    def prepare(b):
        if case == "param_view_base":
            b["param_base"] = np.concatenate([b["param"], np.zeros(7, np.float32)])
            b["param"] = b["param_base"][:n]
        return b

    seed_state = rng.bit_generator.state
    quiet = prepare(buffers())
    for _ in range(steps):
        call(quiet)
    rng.bit_generator.state = seed_state
    loud = prepare(buffers())
    victim = target(loud)
    shared = {"in_call": False, "run": True, "refused": 0, "resized": []}

    def hammer():
        while shared["run"]:
            if shared["in_call"]:
                try:
                    victim.resize(16, refcheck=False)
                    shared["resized"].append(True)
                except ValueError:
                    shared["refused"] += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        for _ in range(steps):
            shared["in_call"] = True
            call(loud)
            shared["in_call"] = False
    finally:
        shared["run"] = False
        thread.join()
    assert not shared["resized"], "a buffer was resized during a core call"
    assert shared["refused"] > 0, "the hammer never ran during a core call; make n larger"
    for key in ("param", "grad", "exp_avg", "exp_avg_sq"):
        assert loud[key].tobytes() == quiet[key].tobytes(), key
    print("refused", shared["refused"])
""")

HAMMER_CASES = ["adam_param", "param_view_base", "adam_grad", "adam_exp_avg_sq", "sgd_momentum_buffer",
                "accumulate_grad_accum"]


@pytest.mark.parametrize("case", HAMMER_CASES)
def test_a_buffer_resized_by_another_thread_during_a_call_is_refused_and_the_result_is_unchanged(case):
    # 2**22 float32 elements (16 MiB a buffer): each call lasts several
    # milliseconds, and a freed buffer of that size is unmapped, so a use
    # after free shows as a crash rather than passing silently.
    proc = subprocess.run([sys.executable, "-c", HAMMER_CHILD, case, str(2**22)], env=child_env(None),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"case {case}: exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.startswith("refused "), proc.stdout


def test_the_core_holds_no_reference_to_a_buffer_after_the_call():
    # Between calls the arrays are the caller's again: resizable and collectable.
    batches = core_batches()
    for b in batches:
        b["step_buffers"] = [np.zeros(1, np.float32), np.zeros(1, np.float32)]
    _core.adam_step(batches)
    _core.sum_squares(batches[0]["grads"])
    param = batches[0]["params"][0]
    param.resize(3, refcheck=False)
    assert param.shape == (3,)


# --------------------------------------------------------------------------
# step_buffers (torch's per-param 'step' tensors) are written by the call, so
# they are checked as every written buffer is, before any byte is written.


def with_step_buffers(batches) -> None:
    for b in batches:
        b["step_buffers"] = [np.full(1, 5.0, np.float32), np.full(1, 5.0, np.float64)]


def unaligned_float64() -> np.ndarray:
    return np.frombuffer(bytearray(9), dtype=np.float64, offset=1, count=1)


def step_buffer_cases():
    def put(batch: int, index: int, make):
        def mutate(batches):
            batches[batch]["step_buffers"][index] = make(batches)
        return mutate

    def count(k: int):
        def mutate(batches):
            batches[1]["step_buffers"] = [np.zeros(1, np.float32) for _ in range(k)]
        return mutate

    name = r"step_buffers\[1\] in group 1"
    return [
        pytest.param(put(1, 1, lambda b: unaligned_float64()), ValueError,
                     rf"^{name}: data is not aligned to its element size$", id="unaligned-float64"),
        pytest.param(put(1, 1, lambda b: np.full(1, 5.0, ">f8")), TypeError,
                     rf"^{name}: expected a float32 or float64 array in native byte order, got >f8$",
                     id="big-endian-float64"),
        pytest.param(put(1, 1, lambda b: np.full(1, 5.0, ">f4")), TypeError,
                     rf"^{name}: expected a float32 or float64 array in native byte order, got >f4$",
                     id="big-endian-float32"),
        pytest.param(put(1, 1, lambda b: b[1]["params"][1].reshape(-1)[4:5]), ValueError,
                     rf"^({name} shares memory with params\[1\] in group 1|params\[1\] in group 1 shares "
                     rf"memory with {name}); buffers written by a step must not overlap$",
                     id="overlaps-its-param"),
        pytest.param(put(1, 1, lambda b: b[1]["exp_avg_sqs"][0][:1]), ValueError,
                     rf"{name}.*exp_avg_sq of params\[0\] in group 1|exp_avg_sq of params\[0\] in group 1.*{name}",
                     id="overlaps-another-params-state"),
        pytest.param(put(1, 1, lambda b: b[0]["exp_avgs"][1].reshape(-1)[:1]), ValueError,
                     rf"{name}.*exp_avg of params\[1\] in group 0|exp_avg of params\[1\] in group 0.*{name}",
                     id="overlaps-a-buffer-of-another-batch"),
        pytest.param(put(1, 1, lambda b: b[1]["step_buffers"][0]), ValueError,
                     r"step_buffers\[0\] in group 1 shares memory with step_buffers\[1\] in group 1|"
                     r"step_buffers\[1\] in group 1 shares memory with step_buffers\[0\] in group 1",
                     id="the-same-step-buffer-twice"),
        pytest.param(put(1, 1, lambda b: b[0]["step_buffers"][0]), ValueError,
                     r"step_buffers\[0\] in group 0 shares memory with step_buffers\[1\] in group 1|"
                     r"step_buffers\[1\] in group 1 shares memory with step_buffers\[0\] in group 0",
                     id="one-step-buffer-in-two-batches"),
        pytest.param(put(1, 1, lambda b: b[1]["grads"][1].reshape(-1)[:1]), ValueError,
                     rf"^grad of params\[1\] in group 1 shares memory with {name}, which the step writes$",
                     id="overlaps-a-grad"),
        pytest.param(count(1), ValueError, r"^step_buffers in group 1 has 1 entries but params has 2$",
                     id="too-few"),
        pytest.param(count(3), ValueError, r"^step_buffers in group 1 has 3 entries but params has 2$",
                     id="too-many"),
        pytest.param(count(0), ValueError, r"^step_buffers in group 1 has 0 entries but params has 2$",
                     id="empty"),
    ]


@pytest.mark.parametrize(("mutate", "exc", "message"), step_buffer_cases())
def test_a_step_buffer_is_checked_like_every_written_buffer(mutate, exc, message):
    batches = core_batches()
    with_step_buffers(batches)
    mutate(batches)
    before = snapshot_bytes(batches)
    with pytest.raises(exc, match=message):
        _core.adam_step(batches)
    assert snapshot_bytes(batches) == before


def test_aligned_native_step_buffers_of_both_dtypes_are_written():
    batches = core_batches()
    with_step_buffers(batches)
    batches[1]["step"] = 9
    _core.adam_step(batches)
    assert [float(a[0]) for b in batches for a in b["step_buffers"]] == [3.0, 3.0, 9.0, 9.0]


# --------------------------------------------------------------------------
# Borders: every kernel on slices of larger arrays whose borders hold a
# sentinel bit pattern, at each supported level, sizes around every vector
# width and each start offset in a 64-byte line (aligned_runs splits there),
# with 1, 2 and 3 threads. Runs in a child per level, with CPUADAM_ISA set.

GUARD_CHILD = textwrap.dedent("""
    import itertools, sys
    import numpy as np
    import cpuadam
    from cpuadam import _core

    SENTINEL = np.uint32(0x7FC0DEAD)  # a quiet NaN whose payload no arithmetic produces
    PAD = 19
    rng = np.random.default_rng(11)
    checked = 0

    def guarded(values, offset, fill=None):
        big = np.full(offset + values.size + PAD, SENTINEL, np.uint32).view(np.float32)
        big[offset:offset + values.size] = values if fill is None else fill
        return big, big[offset:offset + values.size]

    def borders_intact(bigs, offset, n):
        global checked
        for name, big in bigs.items():
            bits = big.view(np.uint32)
            assert (bits[:offset] == SENTINEL).all(), f"{name}: border before the slice written"
            assert (bits[offset + n:] == SENTINEL).all(), f"{name}: border after the slice written"
            checked += 1

    def adam_case(n, offset, decay, amsgrad, grad_input, ema, threads):
        cpuadam.set_num_threads(threads)
        r = np.random.default_rng(n * 1000 + offset)
        vals = {k: r.standard_normal(n).astype(np.float32) for k in ("params", "grads", "exp_avgs", "emas")}
        vals["exp_avg_sqs"] = r.uniform(0, 1, n).astype(np.float32)
        vals["max_exp_avg_sqs"] = r.uniform(1, 2, n).astype(np.float32)
        vals["grad_accums"] = r.standard_normal(n).astype(np.float32)
        bigs, views = {}, {}
        for k, v in vals.items():
            bigs[k], views[k] = guarded(v, offset)
        batch = dict(params=[views["params"]], grads=[views["grads"]], exp_avgs=[views["exp_avgs"]],
                     exp_avg_sqs=[views["exp_avg_sqs"]], step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0 if decay == "none" else 0.02, decoupled=decay == "decoupled",
                     amsgrad=amsgrad, grad_scale=0.5 if grad_input == "scaled" else 1.0)
        if amsgrad:
            batch["max_exp_avg_sqs"] = [views["max_exp_avg_sqs"]]
        if grad_input == "accumulated":
            batch["grad_accums"] = [views["grad_accums"]]
        if grad_input == "clipped":
            batch["clipvalue"] = 0.5
        if ema:
            batch["emas"] = [views["emas"]]
            batch["ema_momentum"] = 0.99
        _core.adam_step([batch])
        used = {k: bigs[k] for k in bigs if k in batch}
        borders_intact(used, offset, n)
        for k, big in used.items():
            assert np.isfinite(big[offset:offset + n]).all(), k
        return b"".join(used[k][offset:offset + n].tobytes() for k in sorted(used))

    sizes = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 127, 129, 1000]
    for n, offset in itertools.product(sizes, (0, 1, 4, 15)):
        for combo in itertools.product(("none", "l2", "decoupled"), (False, True),
                                       ("raw", "scaled", "clipped", "accumulated"), (False, True)):
            results = {adam_case(n, offset, *combo, threads) for threads in (1, 2, 3)}
            assert len(results) == 1, f"thread counts disagree: n={n} offset={offset} {combo}"
        for threads in (1, 2, 3):
            cpuadam.set_num_threads(threads)
            g = rng.standard_normal(n).astype(np.float32)
            bigs = {}
            # SGD's first momentum step writes the whole buffer: NaN before, finite after.
            bigs["params"], p = guarded(rng.standard_normal(n).astype(np.float32), offset)
            bigs["grads"], gv = guarded(g, offset)
            bigs["momentum_buffers"], mb = guarded(g, offset, fill=np.nan)
            _core.sgd_step([dict(params=[p], grads=[gv], momentum_buffers=[mb], lr=1e-2, weight_decay=0.01,
                                 momentum=0.9, momentum_first=True, nesterov=True)])
            assert np.isfinite(mb).all() and np.isfinite(p).all()
            acc_big, acc = guarded(g, offset)
            bigs["grad_accums"] = acc_big
            _core.accumulate([dict(grads=[gv], grad_accums=[acc])])
            assert (acc == g + g).all()
            borders_intact(bigs, offset, n)
            total = _core.sum_squares([gv])[0]
            assert abs(total - float(np.sum(g.astype(np.float64) ** 2))) <= 1e-12 * max(total, 1.0)
    print("checked", checked, cpuadam.build_info()["isa_selected"])
""")


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512", "neon"])
def test_kernels_never_write_outside_their_slices_at_any_level(level):
    from conftest import supported_levels

    if level not in supported_levels():
        pytest.skip(f"ISA level {level} is not available here (supported: {', '.join(supported_levels())})")
    proc = subprocess.run([sys.executable, "-c", GUARD_CHILD], env=child_env(level), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.stdout.split()[-1] == level
