"""Running one command as a distributed job under ``torchrun``: which rank this process is, and the few
collective steps the extract and flow stages need (share work, agree on errors, one progress bar).

Distributed mode is detected from the environment that ``torchrun`` (``python -m torch.distributed.run``) sets:
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, all present and ``WORLD_SIZE`` > 1. Otherwise every helper here is
trivial (one rank; collectives return their input), so a plain run behaves as if this module did not exist.

The process group uses NCCL when the ranks run on CUDA and gloo otherwise; each rank runs on
``cuda:LOCAL_RANK`` (or the CPU). Work is assigned by position: item ``i`` of a list that every rank holds goes to rank
``i mod world_size``. No scheduler of our own: a rank that dies makes ``torchrun`` end the others, and the
stages resume from what was committed.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from .device import resolve_device

T = TypeVar("T")

#: How long a rank waits at a collective for the others (a rank that finished its share waits for the slowest).
JOB_TIMEOUT = datetime.timedelta(hours=24)
#: Seconds between two reads of the job's progress counter by rank 0.
PROGRESS_POLL_S = 0.5


class JobError(Exception):
    """A distributed step failed on some rank; every rank raises this (or, on the failing rank 0, its own error).

    Attributes:
        rank: the lowest rank that failed.
        silent: True on every rank but 0: rank 0 reports the error, the others exit without a message.
    """

    def __init__(self, message: str, rank: int, silent: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.silent = silent


def _describe(err: BaseException) -> str:
    """The error's text; a builtin exception other than OSError, ValueError or RuntimeError (a bug) with its type."""
    text = str(err).strip() or type(err).__name__
    if type(err).__module__ == "builtins" and not isinstance(err, (OSError, ValueError, RuntimeError)):
        text = f"{type(err).__name__}: {text}"
    return text


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` ranks, ``local_rank`` on its node.

    The trivial context (the default, one rank) turns every collective into the identity.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _counters: Iterator[int] = field(default_factory=itertools.count, compare=False, repr=False)
    #: ``failed``: set when :meth:`all_succeed` raised on every rank (so every rank can still meet at the end)
    _state: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def distributed(self) -> bool:
        """True when the job has more than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that locks, assembles, scores and reports."""
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto`` or ``cuda`` when CUDA is available in a
        distributed job, else as :func:`extract.device.resolve_device` resolves ``requested``.

        Raises:
            ValueError: as :func:`extract.device.resolve_device`.
        """
        dev = resolve_device(requested)
        if self.distributed and dev.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return dev

    def backend(self, requested: str) -> str:
        """The process group's backend for the device asked for: ``nccl`` when ranks run on CUDA, else ``gloo``.

        Raises:
            ValueError: as :func:`extract.device.resolve_device`, or CUDA with fewer devices on this node than
                ``LOCAL_RANK`` needs.
        """
        if resolve_device(requested).type != "cuda":
            return "gloo"
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(f"LOCAL_RANK {self.local_rank} needs cuda:{self.local_rank}, but this node has {count} "
                             "CUDA device(s): start at most that many processes per node (--nproc-per-node), or "
                             "pass --device cpu")
        return "nccl"

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (the same list on every rank): item ``i`` goes to rank
        ``i mod world_size``."""
        return assign(items, self.rank, self.world_size)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (a collective)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective; the other ranks' ``obj`` is ignored)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def all_succeed(self) -> Iterator[None]:
        """A block that every rank passes, or that every rank leaves with an error (a collective at its end).

        An exception in the block is held until every rank has reached the end; then, if any rank failed,
        rank 0 raises its own exception when it failed first, else a :class:`JobError` with the first failing
        rank's message, and every other rank raises a silent :class:`JobError`. With one rank the block runs
        as it is (its exception propagates unchanged).

        Raises:
            JobError: another rank failed (or this rank failed and is not rank 0).
        """
        if not self.distributed:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except Exception as err:  # noqa: BLE001 (held for the collective, re-raised below)
            error = err
        messages = self.gather(None if error is None else _describe(error))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if not failed:
            return
        first, message = failed[0]
        self.mark_failed()
        if self.is_main and first == 0 and error is not None:
            raise error
        raise JobError(message, rank=first, silent=not self.is_main) from error

    def mark_failed(self) -> None:
        """Record that every rank failed alike (an error that each rank finds from the same input), so that
        :func:`session` still meets the other ranks at its closing barrier before the job ends."""
        self._state["failed"] = True

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` with ``[rank N] `` before every line on ranks other than 0."""
        if self.is_main:
            return log
        return lambda line: log(f"[rank {self.rank}] {line}")

    @contextlib.contextmanager
    def progress(self, total: int, desc: str, unit: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
        """One progress bar on rank 0 for work done by every rank: yields ``step()``, to call once per unit done.

        Each ``step`` adds 1 to a counter in the job's c10d store (``MASTER_ADDR:MASTER_PORT``, the store
        ``torchrun`` runs); a thread on rank 0 reads it every :data:`PROGRESS_POLL_S` s and moves the bar.
        Every rank must enter the same ``progress`` blocks in the same order (their keys are numbered). With
        one rank, or when the store cannot be reached, ``step`` does nothing and no bar is shown.
        """
        key = f"sanf-ad/progress/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
              f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(self._counters)}"
        store = _store_client() if self.distributed and enabled else None
        if store is None:
            yield lambda: None
            return
        stop = threading.Event()
        poller = None
        if self.is_main:
            poller = threading.Thread(target=_drive_bar, args=(key, total, desc, unit, stop), daemon=True)
            poller.start()
        try:
            yield lambda: store.add(key, 1)
        finally:
            stop.set()
            if poller is not None:
                poller.join()


def assign(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Item ``i`` of ``items`` goes to rank ``i mod world_size``: the shares of all ranks are disjoint and cover
    ``items``, each in the original order.

    Raises:
        ValueError: ``rank`` outside ``0 .. world_size - 1``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(items[rank::world_size])


def _store_client():
    """A client of the job's c10d store at ``MASTER_ADDR:MASTER_PORT``, or None when it cannot be reached."""
    try:
        return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                          is_master=False, timeout=datetime.timedelta(seconds=30))
    except (KeyError, ValueError, RuntimeError):
        return None


def _drive_bar(key: str, total: int, desc: str, unit: str, stop: threading.Event) -> None:
    """Rank 0's thread: move one tqdm bar to the counter ``key`` until ``stop`` is set (its own store client)."""
    from tqdm.auto import tqdm

    store = _store_client()
    if store is None:
        return
    with tqdm(total=total, desc=desc, unit=unit, leave=False) as bar:
        while True:
            finished = stop.wait(PROGRESS_POLL_S)
            try:
                done = int(store.add(key, 0))
            except RuntimeError:  # the store went away (the job is ending)
                return
            bar.update(done - bar.n)
            if finished:
                return


def from_env(environ: Mapping[str, str] | None = None) -> DistContext:
    """The context ``torchrun`` describes in ``environ`` (default ``os.environ``): distributed when ``RANK``,
    ``WORLD_SIZE`` and ``LOCAL_RANK`` are all set and ``WORLD_SIZE`` > 1, else the trivial one-rank context.

    Raises:
        ValueError: the variables are not integers, or ``RANK`` is outside ``0 .. WORLD_SIZE - 1``.
    """
    environ = os.environ if environ is None else environ
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in environ for name in names):
        return DistContext()
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in names)
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; got "
                         + ", ".join(f"{n}={environ[n]!r}" for n in names)) from None
    if world_size <= 1:
        return DistContext()
    if not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"RANK {rank} / LOCAL_RANK {local_rank} do not fit WORLD_SIZE {world_size}")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


@contextlib.contextmanager
def session(device: str = "auto", environ: Mapping[str, str] | None = None) -> Iterator[DistContext]:
    """The job's context, with the process group initialised for its duration when it is distributed
    (NCCL with ``cuda:LOCAL_RANK`` as this rank's device when ``device`` resolves to CUDA, gloo otherwise;
    timeout :data:`JOB_TIMEOUT`).

    At the end every rank meets the others at a barrier, unless it leaves with an error that the other ranks do
    not share (one not raised by :meth:`DistContext.all_succeed`): so rank 0 reports a common error, inside
    the block, before any rank exits (``torchrun`` stops the remaining ranks as soon as one exits non-zero).
    Then the group is destroyed.

    Raises:
        ValueError: as :func:`from_env` and :meth:`DistContext.backend`.
    """
    ctx = from_env(environ)
    if not ctx.distributed:
        yield ctx
        return
    backend = ctx.backend(device)
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    torch.distributed.init_process_group(backend=backend, timeout=JOB_TIMEOUT)
    together = False
    try:
        yield ctx
        together = True
    except BaseException:
        together = bool(ctx._state.get("failed"))
        raise
    finally:
        try:
            if together:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()



@contextlib.contextmanager
def job(device: str = "auto") -> Iterator[DistContext]:
    """:func:`session`, with the environment checked before the ranks connect: a malformed ``RANK`` /
    ``WORLD_SIZE`` / ``LOCAL_RANK``, or fewer GPUs than ranks, is one error of the job, reported by rank 0 (and by
    each node's local rank 0, which finds it alike); the other ranks wait a second for it to be printed, then fail
    silently.

    Raises:
        JobError: the environment is not that of a job (``rank`` 0 on a node's local rank 0: no rank prefix).
    """
    try:
        env = from_env()
        if env.distributed:
            env.backend(device)
    except ValueError as err:
        silent = os.environ.get("LOCAL_RANK", "0") != "0"
        if silent:
            time.sleep(1.0)  # let the node's local rank 0 print before torchrun stops the job
        rank = os.environ.get("RANK", "0")
        raise JobError(str(err), rank=int(rank) if rank.isdigit() else 0, silent=silent) from None
    with session(device) as ctx:
        yield ctx

SINGLE = DistContext()

__all__ = ["JOB_TIMEOUT", "SINGLE", "DistContext", "JobError", "assign", "from_env", "job", "session"]
