"""Statistics summed over a gloo process group equal one process over all the data."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcal

from cases import make_logits

C, BATCHES = 7, 6


def dataset():
    torch.manual_seed(123)
    return [make_logits((2, C, 9, 11)) for _ in range(BATCHES)], [torch.rand(2, 9, 11) > 0.2 for _ in range(BATCHES)]


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits, masks = dataset()
    calibrator = fastcal.LabelCalibrator(C, backend="torch")
    for i in range(rank, BATCHES, world):
        calibrator.update(logits[i], masks[i])
    calibrator.all_reduce()
    torch.save(calibrator.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, masks = dataset()
    single = fastcal.LabelCalibrator(C, backend="torch")
    for x, m in zip(logits, masks):
        single.update(x, m)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        reduced = fastcal.LabelCalibrator(C).load_state_dict(state)
        # the same float32 chunk sums, added in another order in float64
        torch.testing.assert_close(reduced.S, single.S, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reduced.W, single.W, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reduced.prototypes, single.prototypes, rtol=1e-6, atol=1e-7)
        assert reduced.num_pixels == single.num_pixels and reduced.num_updates == BATCHES
        print(f"rank {rank}: pixels={reduced.num_pixels} W={reduced.W.sum().item():.9f} "
              f"max |P - P_single| = {(reduced.prototypes - single.prototypes).abs().max().item():.2e}")


def test_all_reduce_needs_an_initialized_group():
    import pytest

    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        fastcal.LabelCalibrator(3).all_reduce()
