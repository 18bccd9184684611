"""An operation owner in a process of its own, for tests that kill it.

    python owner_process.py ENDPOINT [LEASE_TTL [DONE_IF_CREATED]]

Starts an OperationManager on the store, creates one operation whose task never ends
(with `done_if_created` when given), prints its id on stdout, and waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys

from croft.api.operations import OperationContext, OperationManager
from croft.common.store import connect


async def main(endpoint: str, lease_ttl: int, done_if_created: str | None) -> None:
    store = await connect([endpoint])
    manager = OperationManager(store, lease_ttl=lease_ttl)
    await manager.start()

    async def forever(operation: OperationContext) -> None:
        await asyncio.Event().wait()

    op = await manager.create(
        "Creating instance",
        run=forever,
        resources={"instances": ["/1.0/instances/c1"]},
        done_if_created=done_if_created,
    )
    print(op["id"], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(
        main(
            sys.argv[1],
            int(sys.argv[2]) if len(sys.argv) > 2 else 2,
            sys.argv[3] if len(sys.argv) > 3 else None,
        )
    )
