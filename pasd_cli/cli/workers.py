"""Where this process stands among workers started together: torchrun (and launchers that
follow its conventions) set RANK, WORLD_SIZE and LOCAL_RANK for every worker it starts."""

from __future__ import annotations

import os

from ..batch.world import PEER_TIMEOUT, World
from ..errors import UsageError

_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_world(peer_timeout: float = PEER_TIMEOUT) -> World | None:
    """This worker's place when a launcher started it (RANK and WORLD_SIZE set), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    given = {name: os.environ.get(name, "0") for name in _NAMES}
    listed = " ".join(f"{name}={value}" for name, value in given.items())
    try:
        return World(int(given["RANK"]), int(given["WORLD_SIZE"]), int(given["LOCAL_RANK"]), peer_timeout)
    except ValueError as exc:
        raise UsageError(
            f"{listed}: not a worker's place ({exc})", hint="start the workers with torchrun, or unset RANK"
        ) from None


def launched_local_rank() -> int | None:
    """The worker's GPU on its machine under a launcher (LOCAL_RANK), else None."""
    world = launched_world()
    return None if world is None else world.local_rank
