"""The compute core: instances on this host, their records, and the calls to storage and
network that make them.

The core is the only writer of instance records (`/croft/records/instances/<project>/<name>`)
for instances on its member. Every multi-step change runs under the instance's lock and
undoes what it did when a step fails or the caller goes away (a cancelled gRPC call is
an asyncio cancellation here): a create that does not finish leaves no record, volume,
DHCP entry or LXC definition. A record carries `_croft.state = "creating"` until its
instance is complete, so that a compute service killed half-way cleans up at its next
start (`reconcile`).

`ComputeCore` is put together from one part per concern, each in its own module, as
Incus splits `instance_{post,state,exec,file,console,logs,snapshot}.go`:

| module | part | what it does |
| --- | --- | --- |
| `base` | `CoreBase` | drivers by instance type, locks, storage/network clients, record reads and writes, lifecycle events |
| `instance_devices` | `InstanceDevices` | managed NICs and their limits, definitions written from a record, the root volume's mount |
| `instance_state` | `InstanceState` | start, stop, restart, freeze, unfreeze (templates before a start); running state |
| `instance_create` | `InstanceCreation` | create (from an image, a copy or a backup), delete |
| `instance_update` | `InstanceUpdate` | config, devices and profiles changed, live where they can be |
| `instance_exec` | `InstanceExec` | exec, console, console log, log files |
| `instance_files` | `InstanceFiles` | files pulled, pushed, deleted |
| `instance_snapshots` | `InstanceSnapshots` | snapshots created, renamed, deleted, restored |
| `instance_rename` | `InstanceRename` | rename, and its undo |
| `instance_migration` | `InstanceMigration` | copy, import of a backup, move between pools |
| `reconciler` | `Reconciler` | recovery at start, autostart, the status monitor |
| `instance_publish` | `InstancePublish` | an instance or snapshot as an image tarball |

A part inherits the parts it calls (`InstanceCreation` starts what it created through
`InstanceState`), so each module reads on its own and mypy checks every call across them.
"""

from __future__ import annotations

from croft.compute.base import driver_name, instance_key, root_disk, snapshot_key
from croft.compute.instance_create import CopyOf, RestoreOf
from croft.compute.instance_exec import InstanceExec
from croft.compute.instance_files import InstanceFiles
from croft.compute.instance_migration import InstanceMigration
from croft.compute.instance_publish import InstancePublish
from croft.compute.instance_snapshots import InstanceSnapshots
from croft.compute.instance_update import InstanceUpdate
from croft.compute.reconciler import Reconciler

# What the servicer, the schedules, vga and the tests import from here.
__all__ = [
    "ComputeCore",
    "CopyOf",
    "RestoreOf",
    "driver_name",
    "instance_key",
    "root_disk",
    "snapshot_key",
]


class ComputeCore(
    Reconciler,
    InstanceMigration,
    InstanceUpdate,
    InstanceSnapshots,
    InstanceExec,
    InstanceFiles,
    InstancePublish,
):
    """Instances on this member: the gRPC servicer's one entry point into compute."""
