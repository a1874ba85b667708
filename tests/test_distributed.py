# SPDX-License-Identifier: MIT
"""Scale-out: DDP and ZeroRedundancyOptimizer with cpuadam.torch.AdamW, 2 gloo ranks vs 1."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import warnings

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

with warnings.catch_warnings():
    # torch.distributed.optim scripts its functional optimizers at import time, and
    # torch 2.13 deprecates torch.jit; the warnings are about torch, not us.
    warnings.filterwarnings("ignore", message="`torch.jit.[a-z]+` is deprecated",
                            category=DeprecationWarning)
    from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import cpuadam  # noqa: E402
import cpuadam.torch as ct  # noqa: E402

WORLD = 2
STEPS = 8
HPARAMS = {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}
# Spawning two interpreters that import torch takes a few seconds; anything near
# this bound means a rank is stuck, and the test fails instead of hanging CI.
DEADLINE_S = 120
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(40, 12), torch.nn.Flatten(), torch.nn.Linear(12 * 4, 24),
        torch.nn.LayerNorm(24), torch.nn.GELU(), torch.nn.Linear(24, 5))


def global_batch(step: int):
    """The step's whole batch; each rank takes one contiguous half of it."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 40, (16, 4), generator=gen), torch.randint(0, 5, (16,), generator=gen)


def train(model, opt, rank: int = 0, world: int = 1) -> None:
    for step in range(STEPS):
        tokens, labels = global_batch(step)
        tokens, labels = tokens.chunk(world)[rank], labels.chunk(world)[rank]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens), labels).backward()
        opt.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    cpuadam.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        model = make_model()
        train(DistributedDataParallel(model), ct.AdamW(model.parameters(), **HPARAMS), rank, WORLD)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out_dir, "ddp.pt"))

        # parameters_as_bucket_view=True swaps each param's memory for a slice of a
        # flat bucket after the optimizer has been built.
        for name, bucket_view in (("zero", False), ("zero_bucket_view", True)):
            model = make_model()
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ct.AdamW,
                                          parameters_as_bucket_view=bucket_view, **HPARAMS)
            train(DistributedDataParallel(model), opt, rank, WORLD)
            assert isinstance(opt.optim, ct.AdamW)
            owned = sum(len(g["params"]) for g in opt.optim.param_groups)
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                torch.save({"model": model.state_dict(), "optim": opt.state_dict(),
                            "owned": owned}, os.path.join(out_dir, name + ".pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs both distributed trainings once, in 2 spawned processes, and returns their files."""
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    context = mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return out_dir


def single_process(optimizer_class=ct.AdamW):
    model = make_model()
    opt = optimizer_class(model.parameters(), **HPARAMS)
    train(model, opt)
    return model, opt


def assert_same_weights(state, model):
    for name, expected in model.state_dict().items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_ddp_with_cpuadam_on_two_ranks_matches_one_process(two_ranks):
    model, _ = single_process()
    assert_same_weights(torch.load(os.path.join(two_ranks, "ddp.pt")), model)


@pytest.mark.parametrize("run", ["zero", "zero_bucket_view"])
def test_zero_sharded_cpuadam_on_two_ranks_matches_one_process(two_ranks, run):
    saved = torch.load(os.path.join(two_ranks, run + ".pt"))
    model, opt = single_process()
    n_params = len(list(model.parameters()))
    assert 0 < saved["owned"] < n_params  # the state really was split between the ranks
    assert_same_weights(saved["model"], model)
    ours = saved["optim"]["state"]
    for index, entry in opt.state_dict()["state"].items():
        assert ours[index]["step"].item() == entry["step"].item()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            scale = entry[key].abs().max().item()
            torch.testing.assert_close(ours[index][key], entry[key], rtol=1e-5, atol=1e-6 * scale)


def test_the_single_process_baseline_is_torchs():
    # The two tests above compare against cpuadam in one process; this ties that
    # baseline to torch.optim.AdamW, so the distributed runs match torch too.
    ours, _ = single_process()
    ref, _ = single_process(torch.optim.AdamW)
    assert_same_weights(ours.state_dict(), ref)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
