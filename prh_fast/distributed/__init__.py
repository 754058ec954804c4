"""prh_fast across processes and machines, on ``torch.distributed`` (gloo on CPUs, nccl on GPUs).

- :func:`knn`: exact neighbour lists of a matrix whose rows are split over the ranks (key
  shards passed around a ring, or all-gathered when they fit); equal to ``prh_fast.knn.knn``.
- :func:`align_models`: a model grid (``prh_fast.grid.align_models``) with its model pairs split
  over the ranks; rank 0 writes the outputs; per-pair results are kept so a restart resumes.
- :func:`shard_range` / :func:`run_sharded`: extraction split by sample range, each rank
  writing its own part, merged into one feature file or store on rank 0.
- :func:`init_from_env`: the process group from ``torchrun``'s environment, with a timeout.

``prh-fast align`` runs distributed by itself under ``torchrun`` (``WORLD_SIZE > 1``). See
``docs/distributed.md`` for command lines and the cost model.
"""
from prh_fast.distributed._env import (
    DistributedError,
    default_timeout,
    init_from_env,
    launched_by_torchrun,
    shard_range,
    world,
)
from prh_fast.distributed._extract import part_path, run_sharded
from prh_fast.distributed._grid import align_models
from prh_fast.distributed._knn import knn, shard
from prh_fast.distributed._store import merge_parts

__all__ = [
    "DistributedError",
    "align_models",
    "default_timeout",
    "init_from_env",
    "knn",
    "launched_by_torchrun",
    "merge_parts",
    "part_path",
    "run_sharded",
    "shard",
    "shard_range",
    "world",
]
