"""Fit one calibrator over a dataset split across processes.

    torchrun --nproc_per_node=2 examples/distributed_fit.py

Each rank accumulates the statistics of its shard; ``all_reduce`` sums them, so every
rank ends with the prototypes of the whole dataset, whatever the world size. Here the
"model outputs" are random logits from a fixed seed, so the result can be checked
against a single process: ``python examples/distributed_fit.py --single``.
"""
import argparse
import os

import torch
import torch.distributed as dist

import fastcal

NUM_CLASSES, NUM_BATCHES = 19, 8


def batch(i: int) -> torch.Tensor:
    return torch.randn(2, NUM_CLASSES, 32, 64, generator=torch.Generator().manual_seed(i)) * 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--single", action="store_true", help="fit in one process, for comparison")
    args = parser.parse_args()
    calibrator = fastcal.LabelCalibrator(NUM_CLASSES)
    if args.single:
        for i in range(NUM_BATCHES):
            calibrator.update(batch(i))
        rank = 0
    else:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else "cpu"
        for i in range(rank, NUM_BATCHES, world):  # this rank's shard
            calibrator.update(batch(i).to(device))
        calibrator.all_reduce()
    if rank == 0:
        print(f"pixels: {calibrator.num_pixels}, W sum: {calibrator.W.sum().item():.6f}")
        print("prototype diagonal:", [round(v, 4) for v in calibrator.prototypes.diagonal().tolist()[:6]], "...")
    if not args.single:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
