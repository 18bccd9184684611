"""`python -m croft.compute`: the compute service of this host."""

from __future__ import annotations

import asyncio

from croft.common.service import ServiceContext
from croft.common.service import main as run_service
from croft.compute.core import ComputeCore
from croft.compute.drivers import load_available
from croft.compute.host import favor_cgroup_migrations
from croft.compute.schedules import follow_snapshot_schedules
from croft.compute.servicer import ComputeServicer
from croft.v1 import compute_pb2_grpc


async def setup(context: ServiceContext) -> None:
    if context.config.compute.favor_cgroup_migrations:
        favor_cgroup_migrations()
    # Every driver that can run here, by the instance type it runs: each record's type
    # picks its driver (Incus's instance/drivers/load.go).
    drivers = load_available(
        context.config.compute.drivers,
        lxcpath=str(context.config.lxc_dir),
        vmpath=str(context.config.state_dir / "virtual-machines"),
        log_dir=str(context.config.log_dir),
    )
    core = ComputeCore(context, drivers)
    # The api reads this from the registration to refuse, before placing anything, an
    # instance type no compute service runs.
    context.registration_metadata["instance_types"] = ",".join(core.instance_types())
    compute_pb2_grpc.add_ComputeServicer_to_server(ComputeServicer(core), context.server.grpc)

    async def start_background() -> None:
        # Storage and network may still be starting: reconcile once they answer.
        for _ in range(60):
            try:
                await core.reconcile()
                break
            except Exception:  # noqa: BLE001 (retried; logged by the core on its own)
                await asyncio.sleep(1)
        await core.monitor()

    # The host daemons a driver needs (libvirt's for VMs) are kept up while the service runs.
    context.background(
        *((f"compute-{driver.name}-host", driver.host_services()) for driver in drivers.values()),
        ("compute-reconcile", start_background()),
        ("compute-snapshot-schedules", follow_snapshot_schedules(core)),
    )


def main() -> None:
    run_service("compute", setup)


if __name__ == "__main__":
    main()
