"""Several processes training one model (Lightning's DDP): which process this is, and its share of the data.

- ``rank_and_world`` reads the process group when there is one (inside a DDP process), else one process.
- ``ShardedBatches`` replaces Lightning's ``DistributedSampler`` for the in-memory batches of
  ``cmr_utils.finetune`` and ``cmr_utils.ssl``: it reads the rank when iterated, so it works with the fork-based
  launcher (``ddp_notebook``), where loaders are made before the ranks exist, and with launchers that start every
  rank themselves (torchrun, SLURM).
- ``sum_over_processes`` / ``gather_rows``: exact sums and whole sets across processes (scores, embeddings);
- ``OneThreadWhenForked``: the callback that keeps forked processes from hanging in OpenMP;
- ``launched_externally`` / ``external_geometry`` say whether torchrun or SLURM started this process and with how
  many nodes and processes per node (``cmr_utils.training.trainer_options`` checks a profile against them).
"""
from __future__ import annotations

import os

import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import Sampler


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process: (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedBatches(Sampler):
    """Lists of positions in ``0..n-1``: this rank's batches of one epoch.

    Training (``shuffle=True``): one permutation per epoch, the same on every rank (seeded by ``seed`` and the
    epoch Lightning sets), cut into global batches of ``batch_size`` (the last, short one dropped when ``n`` is
    larger than one batch); each global batch is split into one part per rank. So every rank takes the same number
    of steps, the global batch is the profile's whatever the number of processes, and one process sees exactly
    the single-device batches.

    Evaluation (``shuffle=False``): each rank takes its contiguous share of ``0..n-1`` in order, in batches of
    ``batch_size``: every item is seen exactly once across ranks (no padding, unlike ``DistributedSampler``), so
    sums gathered over ranks are the single-process sums.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0):
        if n < 1 or batch_size < 1:
            raise ValueError(f"ShardedBatches: expected at least one item and batch size >= 1, got n={n}, "
                             f"batch_size={batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed, self.epoch = n, batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (a new permutation per epoch)."""
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        if not self.shuffle:
            return []
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        batches = list(order.split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def check(self, world: int) -> None:
        """Raise if ``world`` processes cannot share these batches: each needs at least one item, and training
        batches (unless one batch holds every item) must split evenly, so that gradients average correctly."""
        if self.n < world:
            raise ValueError(f"{self.n} items cannot be shared among {world} processes (each needs at least one)")
        if self.shuffle and self.n > self.batch_size and self.batch_size % world:
            raise ValueError(f"batch size {self.batch_size} is not a multiple of the {world} processes "
                             f"(trainer.devices x trainer.num_nodes)")

    def _batches(self) -> list[list[int]]:
        rank, world = rank_and_world()
        self.check(world)
        if self.shuffle:
            return [part.tolist() for part in (b.tensor_split(world)[rank] for b in self._global_batches())]
        share = torch.arange(self.n).tensor_split(world)[rank]
        return [b.tolist() for b in share.split(self.batch_size)]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class OneThreadWhenForked(Callback):
    """One torch thread in each process that ``ddp_notebook`` forks (add it only for that strategy).

    GNU OpenMP's thread pool does not survive a fork: a forked process whose parent had used more than one
    thread hangs at its first parallel region (here, DDP's first parameter broadcast: it hung for good after a
    notebook-like parent had run one multi-threaded matrix product). On a CPU the processes are the parallelism
    (one per core); on a GPU the CPU threads hardly matter.
    """

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)


def is_main_process() -> bool:
    """Whether this process writes a stage's outputs: rank 0 of a process group, of a SLURM job or of torchrun
    (each of whose processes executes the whole notebook); always true in a single process and in the notebook's
    own process under the fork-based launcher (the forked ranks never return to the notebook)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    launcher = launched_externally()
    if launcher == "torchrun":
        return int(os.environ.get("RANK", "0")) == 0
    if launcher == "slurm":
        return int(os.environ.get("SLURM_PROCID", "0")) == 0
    return True


def launched_externally() -> str | None:
    """``"torchrun"`` or ``"slurm"`` when that launcher started this process as one of its ranks, else None
    (Lightning's own detection: ``TorchElasticEnvironment.detect``, ``SLURMEnvironment.detect``)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return "torchrun"
    if SLURMEnvironment.detect():
        return "slurm"
    return None


def external_geometry(launcher: str) -> tuple[int, int]:
    """(nodes, processes per node) that torchrun or SLURM started, from their environment variables."""
    env = os.environ
    if launcher == "torchrun":
        per_node = int(env["LOCAL_WORLD_SIZE"])
        return int(env["WORLD_SIZE"]) // per_node, per_node
    nodes = int(env.get("SLURM_NNODES", "1"))
    per_node = env.get("SLURM_NTASKS_PER_NODE")  # e.g. "4" or "4(x2)"
    per_node = int(per_node.split("(")[0]) if per_node else int(env.get("SLURM_NTASKS", "1")) // nodes
    return nodes, per_node


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` (same shape on each, on the process's device) stacked along the first
    dimension, in rank order; the tensor itself outside a process group."""
    rank, world = rank_and_world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every process (a new tensor); the tensor itself outside a process group."""
    if rank_and_world()[1] == 1:
        return tensor
    total = tensor.clone()
    torch.distributed.all_reduce(total)
    return total
