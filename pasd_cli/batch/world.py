"""Workers started together (torchrun): each runs its shard alone; only at the end do they meet,
so that rank 0 prints one summary for the whole batch.

torch.distributed's store (torchrun's own, or one that rank 0 hosts) is joined when the run
starts, and each worker beats a counter there while it works. At the end rank 0 waits for every
other worker to say it has finished, then says that all have; the others wait for that, watching
rank 0 alone (so the store sees few requests however many workers there are). A worker whose
counter stops for `peer_timeout` seconds has died (or its machine or network has): whoever sees
it tells the others, and all give up instead of hanging, however long a slow but living worker
takes. A worker that stops on an error or an interrupt says so at once. Once all have finished,
the process group (gloo, or nccl when the models ran on CUDA) gathers the summaries to rank 0.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import DeviceError, Interrupted, PasdError, first_line
from .records import Summary
from .report import Reporter

if TYPE_CHECKING:
    import torch.distributed as dist

    from .command import Command

PEER_TIMEOUT = 120.0  # seconds without a sign of life before a peer counts as dead
_POLL = 0.5
_PREFIX = "pasd/"


@dataclass(frozen=True)
class World:
    """This worker's place among those started together (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int
    size: int
    local_rank: int = 0
    peer_timeout: float = PEER_TIMEOUT

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size or self.local_rank < 0:
            raise ValueError(f"rank {self.rank} of {self.size} (local rank {self.local_rank}): not a worker's place")
        if self.peer_timeout <= 0:
            raise ValueError(f"peer timeout {self.peer_timeout}: must be positive")


class Meeting:
    """This worker's link to the others, from the start of its run to the merged summary."""

    def __init__(self, world: World):
        import torch.distributed as dist

        self.world = world
        timeout = timedelta(seconds=world.peer_timeout)
        try:  # env:// finds torchrun's store (or rank 0 hosts one) from MASTER_ADDR and MASTER_PORT
            store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
        except (RuntimeError, ValueError) as exc:
            raise DeviceError(
                f"worker {world.rank} of {world.size}: cannot reach the other workers: {first_line(exc)}",
                hint="start the workers with torchrun, which sets MASTER_ADDR and MASTER_PORT for them",
            ) from None
        self.store: dist.Store = store
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat, name="pasd-heartbeat", daemon=True)
        self._beats.start()

    def _beat(self) -> None:
        every = min(max(self.world.peer_timeout / 10, _POLL), 5.0)
        while not self._stop.is_set():
            try:
                self.store.add(f"{_PREFIX}beat/{self.world.rank}", 1)
            except Exception:  # the store's host is gone: the wait at the end says so
                return
            self._stop.wait(every)

    def merge(self, summary: Summary, backend: str, device: Any = None) -> Summary | None:
        """Every worker's summary merged, on rank 0; None on the other ranks. Raises DeviceError
        when a peer stopped before the end."""
        try:
            self._wait_for_peers()
        except DeviceError:
            raise
        except BaseException as exc:  # interrupted while waiting: the others need not wait for it
            self.leave(str(exc) or type(exc).__name__)
            raise
        finally:
            self._stop.set()
        return self._gather(summary, backend, device)

    def leave(self, reason: str) -> None:
        """Stop without meeting (this worker was interrupted or failed): the others stop waiting."""
        self._stop.set()
        try:
            self.store.set(f"{_PREFIX}left/{self.world.rank}", reason)
        except Exception:  # nothing more to tell them: they will see its counter stop
            pass

    def _wait_for_peers(self) -> None:
        """Rank 0 waits for every other worker to finish, then says so; the others wait for
        that, watching rank 0. Whoever sees a peer stop tells the others (abort)."""
        world, store = self.world, self.store
        try:
            store.set(f"{_PREFIX}finished/{world.rank}", "1")
            if world.rank == 0:
                self._wait_for_all()
                store.set(f"{_PREFIX}all-finished", "1")
            else:
                self._wait_for_rank_0()
        except RuntimeError as exc:  # the store's host (rank 0, or torchrun's agent) is gone
            raise _lost(world, f"the other workers' store is gone: {first_line(exc)}") from None

    def _wait_for_all(self) -> None:
        store = self.store
        waiting = set(range(1, self.world.size))
        heard: dict[int, tuple[int, float]] = {}
        while waiting:
            if store.check([f"{_PREFIX}finished/{rank}" for rank in waiting]):
                return
            for rank in sorted(waiting):
                if store.check([f"{_PREFIX}finished/{rank}"]):
                    waiting.discard(rank)
                else:
                    self._check_alive(rank, heard)
            time.sleep(_POLL)

    def _wait_for_rank_0(self) -> None:
        store = self.store
        heard: dict[int, tuple[int, float]] = {}
        while not store.check([f"{_PREFIX}all-finished"]):
            if store.check([f"{_PREFIX}abort"]):
                raise _lost(self.world, store.get(f"{_PREFIX}abort").decode(errors="replace"))
            self._check_alive(0, heard)  # it beats until it has heard from every worker
            time.sleep(_POLL)

    def _check_alive(self, rank: int, heard: dict[int, tuple[int, float]]) -> None:
        """Raise (and tell the others) when worker `rank` left, or its counter stopped."""
        store, now = self.store, time.monotonic()
        what = None
        if store.check([f"{_PREFIX}left/{rank}"]):
            reason = store.get(f"{_PREFIX}left/{rank}").decode(errors="replace")
            what = f"worker {rank} stopped before finishing ({reason})"
        else:
            beats = store.add(f"{_PREFIX}beat/{rank}", 0)
            if rank not in heard or heard[rank][0] != beats:
                heard[rank] = (beats, now)
            elif now - heard[rank][1] > self.world.peer_timeout:
                what = f"worker {rank} stopped for {self.world.peer_timeout:g}s before finishing"
        if what is not None:
            store.set(f"{_PREFIX}abort", what)
            raise _lost(self.world, what)

    def _gather(self, summary: Summary, backend: str, device: Any) -> Summary | None:
        import torch.distributed as dist

        world = self.world
        group_store = dist.PrefixStore(f"{_PREFIX}group", self.store)
        try:
            if backend == "nccl":
                import torch

                torch.cuda.set_device(device)
            dist.init_process_group(
                backend,
                store=group_store,
                rank=world.rank,
                world_size=world.size,
                timeout=timedelta(seconds=world.peer_timeout),
            )
            try:
                gathered = _all_gather_json(_to_json(summary), world.size, device if backend == "nccl" else "cpu")
            finally:
                dist.destroy_process_group()
        except (RuntimeError, ValueError) as exc:  # DistError and its kin are RuntimeErrors
            raise _lost(world, f"gathering the summaries failed: {first_line(exc)}") from None
        return merged([_from_json(item) for item in gathered]) if world.rank == 0 else None


def _all_gather_json(value: dict[str, Any], size: int, device: Any) -> list[dict[str, Any]]:
    """Every worker's `value`, as JSON bytes in tensors: nothing received is unpickled."""
    import torch
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(json.dumps(value, default=str).encode()), dtype=torch.uint8).to(device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length)
    padded = torch.zeros(int(max(n.item() for n in lengths)), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    chunks = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(chunks, padded)
    return [json.loads(bytes(chunk[: int(n.item())].cpu().tolist())) for chunk, n in zip(chunks, lengths)]


class Finish:
    """Which summary a run reports: its own, for a worker alone. Workers started together meet
    first (`meeting`): rank 0 reports the merged summary (kept in `result`), the others none. A
    worker that stops early (interrupted, or a bug) does not meet: it reports its own summary and
    tells the others, who then stop waiting; so does one that cannot meet its peers."""

    def __init__(self, reporter: Reporter, meeting: Meeting | None = None, command: Command | None = None):
        self.reporter, self.meeting, self.command = reporter, meeting, command
        self.called = False
        self.result: Summary | None = None

    def meet(self, summary: Summary, failure: BaseException | None) -> tuple[Summary | None, BaseException | None]:
        """(the summary to report, if any; an error to raise once it is reported, if any).
        `failure`: what stopped this worker's run, if anything did."""
        self.called = True
        meeting = self.meeting
        if meeting is None:
            return summary, None
        if failure is not None and (isinstance(failure, Interrupted) or not isinstance(failure, PasdError)):
            meeting.leave(str(failure) or type(failure).__name__)
            return summary, None
        try:
            device = self.command.meeting_device() if self.command is not None else None
        except PasdError:  # e.g. no CUDA: then no worker used it, and all meet on the CPU
            device = None
        try:
            self.result = meeting.merge(summary, "gloo" if device is None else "nccl", device)
        except DeviceError as exc:  # a peer was lost: this worker's own counts are not
            if failure is not None:
                self.reporter.warn(str(exc))  # the worker's own error is the one to report
                return summary, None
            return summary, exc
        except BaseException as exc:  # interrupted while waiting for the others
            return summary, exc
        return self.result, None


def merged(summaries: list[Summary]) -> Summary:
    """One summary for the workers' summaries: counts and numeric counters add up, the time is
    the slowest worker's, errors are listed."""
    total = Summary(counts=Counter(), seconds=max((s.seconds for s in summaries), default=0.0))
    # The workers make their images side by side: the folder's throughput is all they made over
    # the longest time one of them spent making images.
    total.made_megapixels = sum(s.made_megapixels for s in summaries)
    total.made_seconds = max((s.made_seconds for s in summaries), default=0.0)
    for summary in summaries:
        total.counts.update(summary.counts)
        _add_counters(total.extra, summary.extra)
    errors = [s.error for s in summaries if s.error]
    total.error = "; ".join(dict.fromkeys(errors)) or None
    total.extra["workers"] = len(summaries)
    return total


def _add_counters(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Numbers add up, also in nested dicts (e.g. the prompt sources); anything else is kept
    from the first worker that has it."""
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(total.get(key, {}), dict):
            _add_counters(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key in total:
            total[key] = total[key] + value
        else:
            total.setdefault(key, value)


def _to_json(summary: Summary) -> dict[str, Any]:
    return {
        "counts": dict(summary.counts),
        "seconds": summary.seconds,
        "error": summary.error,
        "extra": summary.extra,
        "made": [summary.made_seconds, summary.made_megapixels],
    }


def _from_json(data: dict[str, Any]) -> Summary:
    made_seconds, made_megapixels = data["made"]
    return Summary(
        Counter(data["counts"]), data["seconds"], data["error"], dict(data["extra"]), made_seconds, made_megapixels
    )


def _lost(world: World, what: str) -> DeviceError:
    return DeviceError(
        f"worker {world.rank} of {world.size}: {what}; outputs may be missing",
        hint="run the same command again: it does only what is missing",
    )
