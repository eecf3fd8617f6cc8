"""Two gloo processes run one OHEM training step of an FPN box head whose conv is followed by a
synchronised batch norm (Detectron2's ``naiveSyncBN``, the one that runs on the CPU; ``SyncBN``
is CUDA-only), with a different number of proposals on each rank, so that the ranks' read-only
passes run different numbers of chunks. Used by tests/test_distributed_norm.py.

    python tests/two_rank_syncbn.py PORT

Each rank prints ``rank R: C collectives`` (its all_gather and all_reduce calls during the step:
the synchronised norm's forward and backward); the exit code is 0 when both ranks finished.
"""
import datetime
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CHUNK = 16
PROPOSALS_PER_RANK = (20, 90)  # 2 and 6 chunks per image in the read-only pass


def count_collectives():
    """Count this process's all_gather and all_reduce calls (the synchronised norm's collectives)."""
    calls = []

    def counted(collective):
        def call(*args, **kwargs):
            calls.append(collective.__name__)
            return collective(*args, **kwargs)

        return call

    dist.all_gather, dist.all_reduce = counted(dist.all_gather), counted(dist.all_reduce)
    return calls


def worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    from detectron2.utils.events import EventStorage

    from conftest import instances, random_fpn_features, random_proposals
    from test_mining import fpn_heads

    torch.manual_seed(0)
    heads = fpn_heads(opts=["MODEL.ROI_BOX_HEAD.NUM_CONV", 1, "MODEL.ROI_BOX_HEAD.CONV_DIM", 16,
                            "MODEL.ROI_BOX_HEAD.NORM", "naiveSyncBN", "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8,
                            "MODEL.OHEM.READONLY_CHUNK_SIZE", CHUNK])
    targets = [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30]], gt_classes=[1])] * 2
    calls = count_collectives()
    with EventStorage():
        _, losses = heads(None, random_fpn_features(), random_proposals(num=PROPOSALS_PER_RANK[rank]), targets)
    sum(losses.values()).backward()
    print(f"rank {rank}: {len(calls)} collectives", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(worker, args=(int(sys.argv[1]),), nprocs=2, start_method="spawn")
