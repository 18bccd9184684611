"""OVN's daemons, started and kept running by the network service (as compute keeps
libvirtd): the central databases (NB, SB) and `ovn-northd`, and this member's chassis,
`ovsdb-server` with `ovs-vswitchd` (the userspace datapath: this kernel has no Open
vSwitch module) and `ovn-controller`.

Every file is under croft's state dir (`<state>/ovn/{db,run,log}`), never /etc or
/var/run, so crofts on one host keep apart. The daemons detach with pid files: a
network service that restarts finds them running and reuses them (a live pid whose
command line is the daemon's), and `ensure()` starts any that died, in dependency order.
The databases are reached over unix sockets only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from croft.common.proc import run

log = logging.getLogger(__name__)

_NB_SCHEMA = "/usr/share/ovn/ovn-nb.ovsschema"
_SB_SCHEMA = "/usr/share/ovn/ovn-sb.ovsschema"
_VSWITCH_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


@dataclass(frozen=True)
class OvnPaths:
    """Where one croft's OVN keeps its files, and the names it gives host interfaces."""

    root: Path
    system_id: str  # this member's chassis name

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def db(self) -> Path:
        return self.root / "db"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def nb(self) -> str:
        return f"unix:{self.run / 'ovnnb_db.sock'}"

    @property
    def sb(self) -> str:
        return f"unix:{self.run / 'ovnsb_db.sock'}"

    @property
    def ovs(self) -> str:
        return f"unix:{self.run / 'db.sock'}"

    def _tag(self, what: str) -> str:
        return hashlib.sha256(f"{self.root}/{what}".encode()).hexdigest()[:6]

    @property
    def integration_bridge(self) -> str:
        """br-int, named per croft: a userspace-datapath bridge is a host tap device."""
        return f"crint{self._tag('br-int')}"

    def uplink_bridge(self, uplink: str) -> str:
        """The OVS bridge an uplink network is mapped to (LXD's `lxdovn<N>`)."""
        return f"crup{self._tag('uplink/' + uplink)}"

    def env(self) -> dict[str, str]:
        """The OVS/OVN tools' environment: nothing of theirs goes to the system paths."""
        # Not croft's services: they outlive them, as the instances they carry do.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CROFT_")}
        return {
            **inherited,
            "OVS_RUNDIR": str(self.run),
            "OVS_DBDIR": str(self.db),
            "OVS_LOGDIR": str(self.logs),
            "OVS_SYSCONFDIR": str(self.root / "etc"),
            "OVN_RUNDIR": str(self.run),
            "OVN_DBDIR": str(self.db),
            "OVN_LOGDIR": str(self.logs),
            "OVN_SYSCONFDIR": str(self.root / "etc"),
        }


def _alive(pid: int, program: str) -> bool:
    """Whether `pid` is a live (not zombie) process running `program`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and program.encode() in cmdline.split(b"\0")[0]


class OvnDaemons:
    """The six daemons of one croft's OVN on this member."""

    ORDER = ("ovnnb_db", "ovnsb_db", "ovn-northd", "ovsdb-server", "ovs-vswitchd", "ovn-controller")
    PROGRAMS = frozenset({"ovsdb-server", "ovn-northd", "ovs-vswitchd", "ovn-controller"})

    def __init__(self, paths: OvnPaths) -> None:
        self.paths = paths

    def _pidfile(self, daemon: str) -> Path:
        return self.paths.run / f"{daemon}.pid"

    @staticmethod
    def _program(daemon: str) -> str:
        return "ovsdb-server" if daemon in ("ovnnb_db", "ovnsb_db") else daemon

    def pid(self, daemon: str) -> int | None:
        """The pid of a running daemon, None when it is not running."""
        try:
            pid = int(self._pidfile(daemon).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, self._program(daemon)) else None

    def _common(self, daemon: str) -> list[str]:
        p = self.paths
        # ovn-controller has no --unixctl: its socket goes to OVN_RUNDIR.
        unixctl = [] if daemon == "ovn-controller" else [f"--unixctl={p.run / (daemon + '.ctl')}"]
        return [
            "--detach",
            "--no-chdir",
            f"--pidfile={self._pidfile(daemon)}",
            *unixctl,
            f"--log-file={p.logs / (daemon + '.log')}",
            "-vconsole:off",
        ]

    def _argv(self, daemon: str) -> list[str]:
        p = self.paths
        if daemon in ("ovnnb_db", "ovnsb_db"):
            return [
                "ovsdb-server",
                *self._common(daemon),
                f"--remote=punix:{p.run / (daemon + '.sock')}",
                str(p.db / f"{daemon}.db"),
            ]
        if daemon == "ovn-northd":
            return ["ovn-northd", f"--ovnnb-db={p.nb}", f"--ovnsb-db={p.sb}", *self._common(daemon)]
        if daemon == "ovsdb-server":
            return [
                "ovsdb-server",
                *self._common(daemon),
                f"--remote=punix:{p.run / 'db.sock'}",
                str(p.db / "conf.db"),
            ]
        return [daemon, p.ovs, *self._common(daemon)]

    def _prepare(self, daemon: str) -> None:
        """Create a daemon's database the first time."""
        schema = {"ovnnb_db": _NB_SCHEMA, "ovnsb_db": _SB_SCHEMA, "ovsdb-server": _VSWITCH_SCHEMA}
        if daemon in schema:
            path = self.paths.db / ("conf.db" if daemon == "ovsdb-server" else f"{daemon}.db")
            if not path.exists():
                run(["ovsdb-tool", "create", str(path), schema[daemon]], env=self.paths.env())

    def _configure_chassis(self) -> None:
        """This member's chassis settings, read by ovn-controller (userspace datapath)."""
        p = self.paths
        vsctl = ["ovs-vsctl", f"--db={p.ovs}", "--timeout=30"]
        run([*vsctl, "--no-wait", "init"], env=p.env())
        run(
            [
                *vsctl,
                "--no-wait",
                "set",
                "open_vswitch",
                ".",
                f"external_ids:system-id={p.system_id}",
                f"external_ids:ovn-remote={p.sb}",
                "external_ids:ovn-encap-type=geneve",
                "external_ids:ovn-encap-ip=127.0.0.1",
                f"external_ids:ovn-bridge={p.integration_bridge}",
                "external_ids:ovn-bridge-datapath-type=netdev",
            ],
            env=p.env(),
        )

    def ensure(self) -> list[str]:
        """Start every daemon that is not running, in order; returns those started.
        Blocking: each daemon's `--detach` returns once it serves."""
        p = self.paths
        for path in (p.run, p.db, p.logs, p.root / "etc"):
            path.mkdir(parents=True, exist_ok=True)
        started = []
        for daemon in self.ORDER:
            if self.pid(daemon) is not None:
                continue
            self._prepare(daemon)
            with contextlib.suppress(FileNotFoundError):
                self._pidfile(daemon).unlink()
            run(self._argv(daemon), env=p.env(), timeout=60)
            if daemon == "ovsdb-server":
                self._configure_chassis()
            started.append(daemon)
        if started:
            log.info("OVN daemons started: %s", ", ".join(started))
        if started:
            # The integration bridge exists before ports are added to it.
            run(
                [
                    "ovs-vsctl",
                    f"--db={p.ovs}",
                    "--timeout=30",
                    "--may-exist",
                    "add-br",
                    p.integration_bridge,
                    "--",
                    "set",
                    "bridge",
                    p.integration_bridge,
                    "datapath_type=netdev",
                    "fail_mode=secure",
                    "other_config:disable-in-band=true",
                ],
                env=p.env(),
            )
        return started

    def running(self) -> bool:
        return self.paths.root.exists() and all(self.pid(d) is not None for d in self.ORDER)

    def _pids(self) -> list[int]:
        """The daemons of this OVN, last started first: by pid file, and by a command
        line naming this OVN's run directory (pid files can be gone with the state)."""
        found = [pid for d in reversed(self.ORDER) if (pid := self.pid(d)) is not None]
        marker = f"{self.paths.run}/".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in found:
                continue
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if Path(argv[0].decode()).name in self.PROGRAMS and any(marker in a for a in argv):
                    found.append(int(entry.name))
        return found

    def stop_all(self) -> None:
        """Stop every daemon and remove the host interfaces the userspace datapath made
        (they outlive ovs-vswitchd). For tests and for taking OVN off a host."""
        bridges: list[str] = []
        if self.pid("ovsdb-server") is not None:
            with contextlib.suppress(Exception):
                out = run(
                    ["ovs-vsctl", f"--db={self.paths.ovs}", "--timeout=10", "list-br"],
                    env=self.paths.env(),
                )
                bridges = out.stdout.decode().split()
        pids = self._pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists() or not _alive(pid, ""):
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for bridge in [*bridges, self.paths.integration_bridge, "ovs-netdev"]:
            if Path(f"/sys/class/net/{bridge}").exists():
                run(["ip", "link", "del", bridge], check=False)
