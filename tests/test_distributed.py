"""Statistics reduced over a gloo process group equal one process that saw all the data.

Cumulative mode: one process fed every batch. Online mode: the ranks step in lockstep, so one
process fed, at step t, the t-th batch of every rank together (see ``LabelCalibrator.all_reduce``).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcal

from cases import make_logits

C = 7
# shards[r] = the batch indices rank r sees, in order: uneven, and rank 2 of three sees nothing
SHARDS = {2: [[0, 2, 4], [1, 3, 5]], 3: [[0, 3, 5, 6], [1, 4], []]}


def dataset(n=7):
    # 256-pixel images: batches put together keep the float32 blocks of 256 pixels of the CPU loops
    torch.manual_seed(123)
    return [make_logits((2, C, 16, 16)) for _ in range(n)], [torch.rand(2, 16, 16) > 0.2 for _ in range(n)]


def worker(rank: int, world: int, port: int, out_dir: str, momentum) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits, masks = dataset()
    shard = SHARDS[world][rank]
    calibrator = fastcal.LabelCalibrator(C, backend="torch", momentum=momentum)
    for i in shard[:1]:
        calibrator.update(logits[i], masks[i])
    calibrator.all_reduce()
    torch.save(calibrator.state_dict(), os.path.join(out_dir, f"first{rank}.pt"))
    calibrator.all_reduce()  # nothing new: nothing changes
    for i in shard[1:]:
        calibrator.update(logits[i], masks[i])
    calibrator.all_reduce()
    torch.save(calibrator.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(steps, momentum):
    """One calibrator fed, step by step, every rank's batch of that step together."""
    logits, masks = dataset()
    single = fastcal.LabelCalibrator(C, backend="torch", momentum=momentum)
    for step in steps:
        if step:
            single.update(torch.cat([logits[i] for i in step]), torch.cat([masks[i] for i in step]))
    return single


def lockstep(shards, start, stop):
    """The batches of steps start..stop-1 since a reduction, step by step: each rank's t-th batch."""
    return [[shard[t] for shard in shards if start <= t < min(stop, len(shard))]
            for t in range(start, max(len(s) for s in shards))]


def assert_same(reduced, single, updates):
    # the same float32 chunk sums, added in another order in float64
    torch.testing.assert_close(reduced.S, single.S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reduced.W, single.W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reduced.counts, single.counts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reduced.prototypes, single.prototypes, rtol=1e-6, atol=1e-7)
    assert reduced.num_pixels == single.num_pixels and reduced.num_updates == updates


# two even shards; three uneven ones with an empty rank, cumulative and online (the lockstep rule's hard case)
@pytest.mark.parametrize("world,momentum", [(2, None), (3, None), (3, 0.3)])
def test_gloo_ranks_equal_one_process(tmp_path, world, momentum):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path), momentum), nprocs=world, join=True)
    shards = SHARDS[world]
    first = one_process(lockstep(shards, 0, 1), momentum)
    # after the first reduction the steps restart: step t is every rank's (t+1)-th batch
    rest = [[shard[t] for shard in shards if t < len(shard)] for t in range(1, max(map(len, shards)))]
    whole = one_process(lockstep(shards, 0, 1) + rest, momentum)
    states = {}
    for rank in range(world):
        for name, single, updates in (("first", first, sum(min(1, len(s)) for s in shards)),
                                      ("rank", whole, sum(map(len, shards)))):
            state = torch.load(tmp_path / f"{name}{rank}.pt", weights_only=True)
            reduced = fastcal.LabelCalibrator(C, momentum=momentum).load_state_dict(state)
            assert_same(reduced, single, updates)
            states.setdefault(name, []).append(state["S"])
    for S in states.values():  # every rank holds the same bits
        assert all(torch.equal(S[0], other) for other in S[1:])


def test_all_reduce_needs_an_initialized_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        fastcal.LabelCalibrator(3).all_reduce()
