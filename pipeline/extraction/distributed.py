"""Who this process is in an extraction job, and the little coordination that a job needs.

Three kinds of worker share one code path:
  - single: a plain `extract`, the whole job in one process;
  - rank:   one of WORLD_SIZE processes started by torchrun (or srun, or any launcher that sets torch.distributed's
            environment); they form a process group, so rank 0 waits for the others and writes the cache;
  - part:   one of N independent processes of a job array (`--shard I/N`), with no process group at all; the
            part that finds every other part done writes the cache (or a later plain `extract` does).

Every worker plans the same way from the same files, cuts the images still to do into the batches a single
process would use, and takes every n-th batch: the same batches go through the model as in a single-process
run, so the cache is the same, bit for bit, whatever the number of workers (on the same kind of device).
Nothing is sent between processes but a plan fingerprint and barriers: each worker commits its own journal
shards, and the cache is written from them.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import traceback
from dataclasses import dataclass
from enum import Enum

from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)

# How long rank 0 waits at the final barrier for the slowest rank. A rank that dies is noticed by torchrun at
# once (it stops every rank and names the failed one); this bounds only a rank that hangs without dying.
BARRIER_TIMEOUT_S = float(os.environ.get("VGGCACHE_BARRIER_TIMEOUT_S", str(6 * 3600)))


class WorkerKind(Enum):
    SINGLE = "single"  # a plain extract: the whole job in one process
    RANK = "rank"  # a rank of a torchrun job (a process group)
    PART = "part"  # a part of a job array (--shard I/N): no process group


@dataclass(frozen=True)
class Worker:
    kind: WorkerKind
    index: int = 0  # rank, or part number
    count: int = 1  # world size, or number of parts
    local_rank: int = 0
    local_count: int = 1

    @property
    def single(self) -> bool:
        return self.kind is WorkerKind.SINGLE

    @property
    def rank(self) -> bool:
        return self.kind is WorkerKind.RANK

    @property
    def part(self) -> bool:
        return self.kind is WorkerKind.PART

    @property
    def follower(self) -> bool:
        """A torchrun rank other than 0: it embeds its share, and rank 0 writes the cache."""
        return self.rank and self.index > 0

    @property
    def name(self) -> str:
        """Journal shards and locks are named after their writer, so workers never write the same file."""
        return {WorkerKind.SINGLE: "main", WorkerKind.RANK: f"rank{self.index}",
                WorkerKind.PART: f"part{self.index}of{self.count}"}[self.kind]

    @property
    def describe(self) -> str:
        return {WorkerKind.SINGLE: "single process", WorkerKind.RANK: f"rank {self.index} of {self.count}",
                WorkerKind.PART: f"part {self.index}/{self.count}"}[self.kind]

    @property
    def who(self) -> str:
        """The prefix of a line this worker prints: nothing for a single process."""
        return "" if self.single else f"{self.describe}: "

    def in_my_array(self, writer: str) -> bool:
        """A part of this worker's job array, itself included (shards named part<J>of<N>)."""
        return self.part and writer.startswith("part") and writer.endswith(f"of{self.count}")

    def take_by(self, items: list, group_of) -> list:
        """This worker's share of `items` by group (a tar shard): every `count`-th group, starting at `index`, so
        that each group is read whole by one worker."""
        return [item for item in items if group_of(item) % self.count == self.index]

    def take(self, items: list, batch_size: int) -> list:
        """This worker's share of `items`: every `count`-th batch of `batch_size`, starting at batch `index`."""
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        return [item for batch in batches[self.index::self.count] for item in batch]


def worker_from(shard: tuple[int, int] | None) -> Worker:
    """This process's place in the job, from `--shard` and the environment torchrun sets."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is not None:
        if world > 1:
            raise UserError("--shard splits a job array; under torchrun every rank already takes its part (drop --shard)")
        return Worker(WorkerKind.PART, shard[0], shard[1])
    if world > 1:
        return Worker(WorkerKind.RANK, int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                      int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    return Worker(WorkerKind.SINGLE)


class Group:
    """The process group of a torchrun job (a no-op for single processes and parts)."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self._gloo = None

    @contextlib.contextmanager
    def started(self, device: str):
        """The process group for the length of the block (nothing to start outside a torchrun job)."""
        self.start(device)
        try:
            yield self
        finally:
            self.stop()

    def start(self, device: str) -> None:
        """NCCL on CUDA, gloo on the CPU; barriers and the plan check always go through gloo (it can name the
        ranks that miss a barrier, and keeps a GPU from spinning while it waits)."""
        if not self.worker.rank:
            return
        import torch
        import torch.distributed as dist

        device_type = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        timeout = datetime.timedelta(seconds=BARRIER_TIMEOUT_S)
        if device_type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(f"cuda:{self.worker.local_rank}"))
            self._gloo = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
            self._gloo = dist.group.WORLD

    def stop(self) -> None:
        if self._gloo is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._gloo = None

    def check_same(self, what: str, value: str) -> None:
        """Every rank must see the same `value` (a digest of its plan): else they would split different work."""
        if self._gloo is None:
            return
        import torch.distributed as dist

        seen = [None] * self.worker.count
        dist.all_gather_object(seen, value, group=self._gloo)
        differ = [r for r, v in enumerate(seen) if v != seen[0]]
        if differ:
            raise UserError(f"ranks see different {what}: rank 0 and rank {differ[0]} disagree (a multi-node run needs "
                            "the data and the output folder on one shared filesystem, identical on every node)")

    def barrier(self) -> None:
        """Wait for every rank; a rank that does not arrive in time is named."""
        if self._gloo is None:
            return
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self._gloo, timeout=datetime.timedelta(seconds=BARRIER_TIMEOUT_S),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            raise UserError(f"rank {self.worker.index}: not every rank finished its part ({first_line(e)[:300]}); "
                            "what they committed is saved: rerun the same command to continue") from None


def quiet_unless_leader(worker: Worker) -> None:
    """Ranks other than 0 print their progress line and their warnings, nothing else: rank 0 speaks for the job."""
    if worker.follower:
        logging.getLogger("pipeline").setLevel(logging.WARNING)
        logging.getLogger("pipeline.progress").setLevel(logging.INFO)


def plan_digest(paths: list[str], batch_size: int) -> str:
    text = "\n".join([str(batch_size), *paths])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def quiet_resource_sharer(previous):
    """A threading.excepthook that drops the broken connections of multiprocessing's resource-sharer thread (how
    torch hands tensors between processes) when the other side stopped, and passes on anything else."""

    def hook(args):
        if issubclass(args.exc_type, (ConnectionError, EOFError)) and "resource_sharer" in "".join(
                traceback.format_tb(args.exc_traceback)):
            return
        previous(args)

    return hook
