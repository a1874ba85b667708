# SPDX-License-Identifier: MIT
"""The benchmark on tiny workloads: report structure, options, and that every timed implementation steps AdamW."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from reference import adam_step

from cpuadam import bench

TINY = ["--sizes", "4096,8x512,1000:amsgrad", "--threads", "1", "--rounds", "2", "--warmup", "1",
        "--no-progress"]
F32_EPS = float(np.finfo(np.float32).eps)


def test_json_report_has_one_consistent_row_per_workload_and_implementation(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(TINY + ["--impls", "cpuadam,numpy,roofline", "--json", str(path)])
    report = json.loads(path.read_text())

    workloads = {"4096": (4096, 1, 28), "8x512": (4096, 8, 28), "1000:amsgrad": (1000, 1, 32)}
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
    assert ams.amsgrad and ams.bytes_per_step == 32 * 2**24
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


def test_roofline_proxy_leaves_the_shared_buffers_unchanged():
    bufs = bench.Buffers(bench.Workload("t", ((1000,), (17,))), seed=3)
    for a, g in zip(bufs.exp_avg_sqs, bufs.grads):
        a[...] = g * g
    before = [a.copy() for a in bufs.params + bufs.exp_avgs + bufs.exp_avg_sqs]
    step = bench._prepare("roofline", bufs)
    step()
    after = bufs.params + bufs.exp_avgs + bufs.exp_avg_sqs
    assert all(np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(before, after))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bench.main(TINY + ["--impls", "cpuadam,numpy,roofline", "--plot", str(path)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
