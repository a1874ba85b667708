# SPDX-License-Identifier: MIT
"""The benchmark on tiny workloads: report structure, options, precision workloads and their bytes, and
that every timed implementation steps AdamW."""

from __future__ import annotations

import json
import math
import statistics
import sys

import numpy as np
import pytest
from reference import (adam_step, bf16_round_nearest, bf16_to_float32, dequantize_blockwise, dynamic_map,
                       quantize_blockwise)

from cpuadam import bench

TINY = ["--sizes", "4096,8x512,1000:amsgrad", "--threads", "1", "--rounds", "2", "--warmup", "1",
        "--no-progress"]
F32_EPS = float(np.finfo(np.float32).eps)


def test_json_report_has_one_consistent_row_per_workload_and_implementation(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(TINY + ["--impls", "cpuadam,numpy,roofline", "--json", str(path)])
    report = json.loads(path.read_text())

    workloads = {"4096": (4096, 1, 28), "8x512": (4096, 8, 28), "1000:amsgrad": (1000, 1, 36)}
    impls = ("cpuadam", "numpy", "roofline")
    rows = report["rows"]
    assert sorted((r["workload"], r["impl"]) for r in rows) == sorted((w, i) for w in workloads for i in impls)
    assert report["meta"]["isa_selected"] in report["meta"]["isa_compiled"]
    assert report["config"]["threads"] == [1]
    for r in rows:
        n_params, n_tensors, bytes_per_param = workloads[r["workload"]]
        assert (r["n_params"], r["n_tensors"], r["threads"]) == (n_params, n_tensors, 1)
        # The roofline proxy moves 28 B/param whatever the workload's step moves.
        expected_bytes = (28 if r["impl"] == "roofline" else bytes_per_param) * n_params
        assert r["bytes_per_step"] == expected_bytes
        assert len(r["times_s"]) == 2 and min(r["times_s"]) > 0
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["gbps"] == pytest.approx(expected_bytes / r["median_s"] / 1e9)
        assert r["us_per_tensor"] == pytest.approx(r["median_s"] / n_tensors * 1e6)
        cell = {o["impl"]: o for o in rows if o["workload"] == r["workload"]}
        assert r["roofline_fraction"] == pytest.approx(r["gbps"] / cell["roofline"]["gbps"])
        peers = {} if r["impl"] == "roofline" else {
            k: o["median_s"] / r["median_s"] for k, o in cell.items() if k not in ("roofline", r["impl"])}
        assert r["speedup_vs"] == pytest.approx(peers)

    out = capsys.readouterr().out
    assert "% roofline" in out and "ISA level" in out
    assert all(f" {impl} " in out for impl in impls)


def test_many_tensor_cost_compares_a_list_with_one_tensor_of_its_size(tmp_path):
    report = bench.main(TINY + ["--impls", "cpuadam,roofline"])
    rows = {(r["workload"], r["impl"]): r for r in report["rows"]}
    [entry] = report["many_tensor_cost"]
    assert (entry["workload"], entry["single"], entry["impl"]) == ("8x512", "4096", "cpuadam")
    assert entry["cost"] == pytest.approx(rows["4096", "cpuadam"]["gbps"] / rows["8x512", "cpuadam"]["gbps"])


def test_markdown_output_is_a_pipe_table(capsys):
    bench.main(TINY + ["--impls", "cpuadam,roofline", "--markdown", "--scaling"])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("| workload | threads | impl | ms/step | GB/s | % roofline | µs/tensor | vs cpuadam |")
    assert lines[start + 1].startswith("| --- | ---: | --- |")
    assert sum(line.startswith("| 8x512 | 1 |") for line in lines) == 2


def test_unknown_implementation_or_workload_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--impls", "cpuadam,adagrad"])
    assert exc.value.code == 2
    assert "unknown implementation(s) adagrad" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "16Q"])
    assert "not a size: '16q'" in capsys.readouterr().err


def test_workload_names_give_the_documented_shapes():
    assert bench.parse_workload("16M").shapes == ((16 * 2**20,),)
    many = bench.parse_workload("4096x4096")
    assert (many.n_tensors, many.n_params, many.bytes_per_step) == (4096, 2**24, 28 * 2**24)
    ams = bench.parse_workload("16M:amsgrad")
    # AMSGrad reads and writes max_exp_avg_sq too: 28 + 8.
    assert ams.amsgrad and ams.bytes_per_step == 36 * 2**24
    assert bench.parse_workload("64k").n_params == 65536
    for bad in ("", "abc", "0", "10x0", "1M:adam", "1.5M"):
        with pytest.raises(ValueError):
            bench.parse_workload(bad)


def test_gpt2_shapes_add_up_to_gpt2_small():
    shapes = bench.gpt2_shapes()
    # GPT-2 small: 124,439,808 parameters with the output head tied to the token embedding.
    assert sum(int(np.prod(s)) for s in shapes) == 124_439_808
    assert len(shapes) == 2 + 12 * 12 + 2
    assert shapes[:2] == ((50257, 768), (1024, 768))


def test_thread_lists_accept_all_and_powers_of_two(monkeypatch):
    monkeypatch.setattr(bench, "_available_cpus", lambda: 12)
    assert bench._parse_threads("1,all") == [1, 12]
    assert bench._parse_threads("pow2") == [1, 2, 4, 8, 12]
    assert bench._parse_threads("3,1,3") == [1, 3]


def _expected_adamw(bufs: bench.Buffers, steps: int) -> list:
    """The fp64 reference run for `steps` AdamW steps on copies of the buffers' initial params."""
    out = []
    for p, g in zip(bufs.params, bufs.grads):
        p64, state = p.astype(np.float64), {}
        for step in range(1, steps + 1):
            adam_step(p64, g, state, step=step, lr=bench.LR, beta1=bench.BETAS[0], beta2=bench.BETAS[1],
                      eps=bench.EPS, weight_decay=bench.WEIGHT_DECAY, amsgrad=bufs.workload.amsgrad,
                      decoupled=True)
        out.append(p64)
    return out


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_every_available_implementation_steps_adamw_on_the_shared_buffers(amsgrad):
    keys = [k for k, reason in bench._availability([i.key for i in bench.IMPLS]).items()
            if reason is None and k != "roofline"]
    assert {"cpuadam", "numpy"} <= set(keys)
    workload = bench.Workload("t", ((37,), (5, 3), (1,)), amsgrad=amsgrad)
    steps = 3
    for key in keys:
        bufs = bench.Buffers(workload, seed=7)
        expected = _expected_adamw(bufs, steps)
        try:
            step = bench._prepare(key, bufs)
        except bench._Unsupported:
            continue
        for _ in range(steps):
            step()
        for p, want in zip(bufs.params, expected):
            tol = steps * F32_EPS * (4 * np.abs(want) + 64 * bench.LR)
            assert np.all(np.abs(p - want) <= tol), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_roofline_proxy_leaves_the_shared_buffers_unchanged(precision):
    bufs = bench.Buffers(bench.Workload("t", ((1000,), (17,)), precision=bench.PRECISIONS[precision]), seed=3)
    fp32 = bufs.fp32  # the proxy's float32 pass, whatever the workload's precision
    for a, g in zip(fp32.exp_avg_sqs, fp32.grads):
        a[...] = g * g
    before = [a.copy() for a in fp32.params + fp32.exp_avgs + fp32.exp_avg_sqs]
    step = bench._prepare("roofline", bufs)
    step()
    after = fp32.params + fp32.exp_avgs + fp32.exp_avg_sqs
    assert all(np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(before, after))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bench.main(TINY + ["--impls", "cpuadam,numpy,roofline", "--plot", str(path)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- precision workloads ----------------------------------------------------------------------

def _moved(numel, param_bytes, state_bytes, moments=2, absmax=False):
    """Bytes read + written: param r/w, grad r, each moment r/w, and per 8-bit moment one
    float32 absmax per 256 elements r/w."""
    blocks = -(-numel // 256)
    return numel * (3 * param_bytes + 2 * moments * state_bytes) + (2 * moments * 4 * blocks if absmax else 0)


def test_precision_suffixes_combine_with_the_variants_in_any_order():
    n = 16 * 2**20
    cases = {"16M": ("fp32", 28), "16M:fp32": ("fp32", 28), "16M:bf16": ("bf16", 14),
             "16M:bf16-fp32": ("bf16-fp32", 22), "16M:8bit": ("8bit", 16 + 1 / 16),
             "16M:bf16-8bit": ("bf16-8bit", 10 + 1 / 16), "16M:BF16": ("bf16", 14)}
    for spec, (precision, per_param) in cases.items():
        w = bench.parse_workload(spec)
        assert (w.name, w.precision.name, w.n_params, w.amsgrad, w.each) == (spec, precision, n, False, False)
        assert w.bytes_per_param == per_param and w.bytes_per_step == per_param * n
    both = bench.parse_workload("16M:amsgrad:bf16")
    assert (both.precision.name, both.amsgrad, both.bytes_per_param) == ("bf16", True, 18)
    many = bench.parse_workload("1000x4096:each:bf16-8bit")
    assert (many.precision.name, many.each, many.n_tensors) == ("bf16-8bit", True, 1000)
    assert bench.parse_workload("gpt2:bf16").shapes == bench.gpt2_shapes()
    assert bench.parse_workload("1M:amsgrad:each").amsgrad and bench.parse_workload("1M:amsgrad:each").each


@pytest.mark.parametrize("spec, words", [
    ("1M:bf8", "unknown workload suffix 'bf8'"), ("1M:", "unknown workload suffix ''"),
    ("1M:bf16:8bit", "names two precisions ('bf16' and '8bit')"), ("1M:each:each", "names ':each' twice"),
    ("1M:bf16-fp16", "unknown workload suffix 'bf16-fp16'"), ("0:bf16", "has no parameters")])
def test_bogus_suffixes_are_refused_with_their_words(spec, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        bench.parse_workload(spec)


def test_bytes_per_param_count_what_each_precision_reads_and_writes():
    f32, bf16 = 4, 2
    big, small, odd = 2**20, 1000, 5000  # small: under min_8bit_size, so float32 moments
    want = {
        "fp32": lambda n, k: _moved(n, f32, f32, k),
        "bf16": lambda n, k: _moved(n, bf16, bf16, k),
        "bf16-fp32": lambda n, k: _moved(n, bf16, f32, k),
        "8bit": lambda n, k: _moved(n, f32, 1, k, absmax=True) if n >= 4096 else _moved(n, f32, f32, k),
        "bf16-8bit": lambda n, k: _moved(n, bf16, 1, k, absmax=True) if n >= 4096 else _moved(n, bf16, f32, k),
    }
    for name, moved in want.items():
        precision = bench.PRECISIONS[name]
        assert precision.bytes_per_param() == moved(big, 2) / big
        assert precision.bytes_per_param(amsgrad=True) == moved(big, 3) / big
        for amsgrad, k in ((False, 2), (True, 3)):
            w = bench.Workload("t", ((small,), (odd,), (big,)), amsgrad=amsgrad, precision=precision)
            assert w.bytes_per_step == moved(small, k) + moved(odd, k) + moved(big, k)
            assert w.bytes_per_param == pytest.approx(w.bytes_per_step / w.n_params)
    gpt2 = bench.parse_workload("gpt2:8bit")
    assert gpt2.bytes_per_step == sum(want["8bit"](math.prod(s), 2) for s in bench.gpt2_shapes())
    assert 16.0625 < gpt2.bytes_per_param < 16.1  # the LayerNorms and biases keep float32 moments


def test_buffers_hold_each_precision_with_the_float32_twin_they_round_from():
    w = bench.Workload("t", ((5000,), (37,)), amsgrad=True, precision=bench.PRECISIONS["bf16-8bit"])
    bufs = bench.Buffers(w, seed=5)
    twin = bufs.fp32
    assert twin.workload.precision.name == "fp32" and twin.fp32 is twin
    for p, g, p32, g32 in zip(bufs.params, bufs.grads, twin.params, twin.grads):
        assert p.dtype == np.uint16 and p32.dtype == np.float32
        np.testing.assert_array_equal(p, bf16_round_nearest(p32))
        np.testing.assert_array_equal(g, bf16_round_nearest(g32))
    assert bufs.state_dtypes == ["8bit", "float32"]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert [a.dtype for a in bufs.moments[key]] == [np.uint8, np.float32]
        assert bufs.absmaxs[key][0].shape == (20,) and bufs.absmaxs[key][1] is None
    for a in [*bufs.params, *bufs.grads, *bufs.exp_avgs, *twin.params, *twin.zero_grads]:
        assert a.ctypes.data % 64 == 0


def _initial(bufs, i):
    p, g = bufs.params[i], bufs.grads[i]
    if p.dtype == np.uint16:
        p, g = bf16_to_float32(p), bf16_to_float32(g)
    return p.astype(np.float64), g.astype(np.float64)


def _as_float32(a):
    return bf16_to_float32(a) if a.dtype == np.uint16 else a


@pytest.mark.parametrize("precision", ["bf16", "bf16-fp32", "8bit", "bf16-8bit"])
def test_every_available_implementation_steps_each_precision_on_the_shared_buffers(precision):
    """One AdamW step (from zero moments, so the stored moments' rounding does not reach the
    params yet) against the float64 reference, and the moments the shared state now holds."""
    keys = [k for k, reason in bench._availability([i.key for i in bench.IMPLS]).items()
            if reason is None and k != "roofline"]
    # One tensor of 8-bit moments (three blocks, the last short) and one that keeps float32 ones.
    workload = bench.Workload("t", ((4096 + 5,), (37,)), precision=bench.PRECISIONS[precision])
    stepped = set()
    for key in keys:
        bufs = bench.Buffers(workload, seed=7)
        ours = bufs.fp32 if key == "cpuadam-fp32" else bufs
        initial = [(ours.params[i].astype(np.float64), ours.grads[i].astype(np.float64)) if ours is not bufs
                   else _initial(bufs, i) for i in range(workload.n_tensors)]
        # global_clipnorm=1 scales the grads by 1 / max(global norm, 1).
        norm = math.sqrt(sum(float(np.sum(g * g)) for _, g in initial))
        grad_scale = 1.0 / max(norm, 1.0) if "clip" in key else 1.0
        expected = []
        for p64, g64 in initial:
            state = {}
            adam_step(p64, g64, state, step=1, lr=bench.LR, beta1=bench.BETAS[0], beta2=bench.BETAS[1],
                      eps=bench.EPS, weight_decay=bench.WEIGHT_DECAY, decoupled=True, grad_scale=grad_scale)
            expected.append((p64, state))
        try:
            step = bench._prepare(key, bufs)
        except bench._Unsupported:
            continue
        step()
        stepped.add(key)
        for i, (want, state) in enumerate(expected):
            p = _as_float32(ours.params[i])
            tol = 4 * F32_EPS * (4 * np.abs(want) + 64 * bench.LR)  # the float32 step's bound
            if ours.params[i].dtype == np.uint16:
                # One bfloat16 rounding (unit roundoff 2**-8) of the float32 result; torch's foreach and
                # for-loop steps compute in bfloat16 throughout: the decayed param and the update
                # rounded too. Either way well under the update (lr) a skipped step would miss.
                u = 2.0**-8
                tol = tol + (2 * u * np.abs(want) + 8 * u * bench.LR if key in ("torch-foreach", "torch-forloop")
                             else u * np.abs(want))
            assert np.all(np.abs(p - want) <= tol), (key, i)
            if key == "bitsandbytes":
                continue  # it keeps its own state
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                exact = state[name]
                codes = ours.moments[name][i]
                absmax = ours.absmaxs[name][i]
                if absmax is not None:
                    # The nearest code of each new float32 moment: within half the widest gap
                    # of the map (under 1% of the block's absmax) of the exact value.
                    blocks = np.repeat(absmax.astype(np.float64), 256)[:exact.size]
                    _, want_absmax = quantize_blockwise(exact.astype(np.float32), dynamic_map(signed))
                    np.testing.assert_allclose(absmax, want_absmax, rtol=1e-6, err_msg=key)
                    got = dequantize_blockwise(codes, absmax, dynamic_map(signed))
                    assert np.all(np.abs(got - exact) <= 0.01 * blocks), (key, name, i)
                else:
                    got = _as_float32(codes)
                    # float32: DeepSpeed takes 1 - beta2 in float32 (0.999f is 1.3e-8 off), 1.3e-5 relative.
                    rel = 2.0**-8 if codes.dtype == np.uint16 else 1e-4
                    assert np.all(np.abs(got - exact) <= rel * np.abs(exact) + 1e-30), (key, name, i)
    assert {"cpuadam", "cpuadam._core", "cpuadam-fp32"} <= stepped


def test_a_tiny_precision_run_has_a_row_per_implementation_that_supports_the_arrangement(tmp_path, capsys):
    specs = ["64k:bf16", "64k:bf16-fp32", "64k:8bit", "64k:bf16-8bit"]
    path = tmp_path / "bench.json"
    report = bench.main(["--sizes", ",".join(specs), "--threads", "1", "--rounds", "1", "--warmup", "1",
                         "--no-progress", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    out = capsys.readouterr().out
    available = {k for k, reason in bench._availability([i.key for i in bench.IMPLS]).items() if reason is None}
    n = 64 * 1024
    for spec in specs:
        precision = spec.split(":")[1]
        expected = {"cpuadam", "cpuadam._core", "cpuadam.torch", "cpuadam-fp32", "roofline"}
        expected |= {"torch-fused", "torch-foreach", "torch-forloop"} if precision == "bf16" else set()
        expected |= {"deepspeed"} if precision == "bf16-fp32" else set()
        expected |= {"bitsandbytes"} if precision.endswith("8bit") else set()
        rows = {r["impl"]: r for r in report["rows"] if r["workload"] == spec}
        assert set(rows) == expected & available, spec
        workload = bench.parse_workload(spec)
        for key, r in rows.items():
            moved = 28 * n if key in ("roofline", "cpuadam-fp32") else workload.bytes_per_step
            assert (r["precision"], r["bytes_per_step"], r["bytes_per_param"]) == (precision, moved, moved / n)
            assert len(r["times_s"]) == 1 and math.isfinite(r["median_s"]) and r["median_s"] > 0
            assert r["gbps"] == pytest.approx(moved / r["median_s"] / 1e9)
            assert r["roofline_fraction"] == pytest.approx(r["gbps"] / rows["roofline"]["gbps"])
            if key != "cpuadam-fp32" and key != "roofline":
                assert r["speedup_vs"]["cpuadam-fp32"] == pytest.approx(
                    rows["cpuadam-fp32"]["median_s"] / r["median_s"])
    assert [w["bytes_per_param"] for w in report["config"]["workloads"]] == [14, 22, 16.0625, 10.0625]
    skipped = {(s["impl"], s["workload"]): s["reason"] for s in report["skipped"]}
    for spec in specs:
        assert skipped["numpy", spec] == "the NumPy peer steps float32 buffers only"
    if "torch-fused" in available:
        assert skipped["torch-fused", "64k:bf16-fp32"] == "torch.optim keeps the moments in the param's dtype"
    for key in ("deepspeed", "bitsandbytes"):
        if key not in available:  # a missing peer drops its row once, whatever the workloads
            [(workload, reason)] = [(w, r) for (k, w), r in skipped.items() if k == key]
            assert workload is None and "not" in reason
    assert f"skipped numpy on {', '.join(specs)}: the NumPy peer steps float32 buffers only" in out
    assert "bf16 14 (18), bf16-fp32 22 (30), 8bit 16.0625 (18.0938), bf16-8bit 10.0625 (12.0938)" in out


def test_a_broken_bitsandbytes_only_drops_its_row(monkeypatch):
    torch_missing = bench._availability(["torch-fused"])["torch-fused"]  # bitsandbytes needs torch first
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    reasons = bench._availability(["bitsandbytes", "cpuadam", "cpuadam-fp32"])
    assert reasons["bitsandbytes"] == torch_missing or (
        torch_missing is None and reasons["bitsandbytes"].startswith("bitsandbytes is not importable (ModuleNotFound"))
    assert reasons["cpuadam"] is None and reasons["cpuadam-fp32"] is None


def test_precisions_option_runs_each_workload_that_names_none_in_each(capsys):
    assert bench._cross_precisions(["16M", "gpt2:each", "1M:8bit"], ["fp32", "bf16", "bf16-8bit"]) == [
        "16M", "16M:bf16", "16M:bf16-8bit", "gpt2:each", "gpt2:bf16:each", "gpt2:bf16-8bit:each", "1M:8bit"]
    args = bench._parse_args(["--sizes", "4096,4096:bf16", "--precisions", "fp32,bf16"])
    assert [w.name for w in args.workloads] == ["4096", "4096:bf16"]
    with pytest.raises(SystemExit) as exc:
        bench.main(["--sizes", "4096", "--precisions", "bf16,fp8"])
    assert exc.value.code == 2
    assert "unknown precision(s) fp8" in capsys.readouterr().err


def test_cpuadam_fp32_row_is_skipped_on_float32_workloads():
    with pytest.raises(bench._Unsupported, match="the workload is float32"):
        bench._prepare("cpuadam-fp32", bench.Buffers(bench.parse_workload("4096")))
