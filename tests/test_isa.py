# SPDX-License-Identifier: MIT
"""Each ISA level this CPU supports, forced with CPUADAM_ISA in a subprocess, against the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ALL_LEVELS, supported_levels
from test_kernel import ADAM_L2_MAXIMIZE, FULL, Pair

import cpuadam

SIZES = [1009, 17, 33, 65, 1]
STEPS = 20
CASES = {"adamw_amsgrad_keras": (FULL, True), "adam_l2_maximize": (ADAM_L2_MAXIMIZE, False)}

# Runs in the child: steps the saved buffers with the saved grads, saves the
# results and prints what the core reports about its level.
CHILD = """
import json, sys
import numpy as np
import cpuadam
from cpuadam import _core

inputs, outputs, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data, out = np.load(inputs), {}
for name, case in spec.items():
    keys = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    bufs = {k: [data[f"{name}/{k}/{i}"].copy() for i in range(case["count"])] for k in keys}
    for s in range(case["steps"]):
        grads = [data[f"{name}/grads/{s}/{i}"] for i in range(case["count"])]
        _core.adam_step([dict(bufs, grads=grads, step=s + 1, amsgrad=case["amsgrad"], **case["hyper"])])
    out.update({f"{name}/{k}/{i}": a for k in keys for i, a in enumerate(bufs[k])})
np.savez(outputs, **out)
info = cpuadam.build_info()
print(json.dumps({"isa_selected": info["isa_selected"], "isa_forced": info["isa_forced"]}))
"""


def child_env(level: str | None) -> dict:
    """This environment, with CPUADAM_ISA set to level (or removed), importing this cpuadam."""
    env = dict(os.environ)
    env.pop("CPUADAM_ISA", None)
    if level is not None:
        env["CPUADAM_ISA"] = level
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cpuadam.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def run_python(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_each_supported_level_matches_the_reference_when_forced(level, tmp_path, rng):
    if level not in supported_levels():
        pytest.skip(f"ISA level {level} is not available here (supported: {', '.join(supported_levels())})")
    pairs, grads_by_case, inputs, spec = {}, {}, {}, {}
    for name, (hyper, amsgrad) in CASES.items():
        pair = pairs[name] = Pair(SIZES, rng, amsgrad)
        grads = grads_by_case[name] = [pair.new_grads() for _ in range(STEPS)]
        for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            inputs.update({f"{name}/{k}/{i}": a for i, a in enumerate(getattr(pair, k))})
        for s, g in enumerate(grads):
            inputs.update({f"{name}/grads/{s}/{i}": a for i, a in enumerate(pair.split(g))})
        spec[name] = dict(count=len(SIZES), steps=STEPS, amsgrad=amsgrad, hyper=hyper)
    np.savez(tmp_path / "inputs.npz", **inputs)
    proc = run_python(CHILD, child_env(level), str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz"),
                      json.dumps(spec))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"isa_selected": level, "isa_forced": True}
    outputs = np.load(tmp_path / "outputs.npz")
    for name, (hyper, _) in CASES.items():
        pair = pairs[name]
        for t, g in enumerate(grads_by_case[name], start=1):
            pair.reference(g, t, hyper)
        for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            setattr(pair, k, [outputs[f"{name}/{k}/{i}"] for i in range(len(SIZES))])
        pair.check()


def test_an_unknown_level_fails_the_import_and_lists_the_choices():
    code = ("try:\n    import cpuadam\nexcept ImportError as e:\n    print(e)\n"
            "else:\n    raise SystemExit('import succeeded')\n")
    proc = run_python(code, child_env("bogus"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    message = proc.stdout
    assert "CPUADAM_ISA=bogus" in message
    for level in cpuadam.build_info()["isa_compiled"]:
        assert level in message


def test_without_the_variable_the_best_supported_level_is_chosen():
    code = "import json, cpuadam; print(json.dumps(cpuadam.build_info()))"
    proc = run_python(code, child_env(None))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    best = max(info["isa_supported"], key=ALL_LEVELS.index)
    assert info["isa_selected"] == best
    assert info["isa_forced"] is False
    assert set(info["isa_supported"]) <= set(info["isa_compiled"])
