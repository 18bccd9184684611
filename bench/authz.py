"""Issue 20's authorization figure: what fine-grained authorization adds to
`GET /1.0/instances?recursion=1` with 100 instances, for an identity whose groups hold
1,000 entitlements (target: under 1 ms).

An api replica on a real etcd (started here) answers in process through its whole ASGI
stack, middlewares included; only the TLS handshake is left out, the caller's Identity
being handed to the middleware as the handshake would. The same request is timed for a
trusted certificate in no group (full access: no check at all) and for one held to its
groups (the middleware's question, then the list's one `can_view` per instance), and the
difference of the medians is the figure. Also: the first request after a change to the
auth records (the records read again and the grants rebuilt), and one `Grants.allows`.

    .venv/bin/python bench/authz.py [--instances 100] [--entitlements 1000] [--runs 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import timeit
from typing import Any

from croft.api import auth, records
from croft.api.access_rules import rule_for
from croft.api.app import create_app
from croft.api.authz import group_key, identity_key, viewable
from croft.api.context import ApiSettings
from croft.api.entitlements import instance
from croft.api.identity import Identity
from croft.common.store import connect
from croft.common.testing.etcd import EtcdServer

FREE = Identity("tls", True, fingerprint="f" * 64, name="free")
HELD = Identity("tls", True, fingerprint="a" * 64, name="held")


async def _request(app: Any, path: str, query: str) -> tuple[int, bytes]:
    scope = {
        "type": "http", "scheme": "https", "method": "GET", "path": path,
        "raw_path": path.encode(), "query_string": query.encode(), "headers": [],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8443), "root_path": "",
        "http_version": "1.1",
    }  # fmt: skip
    body = bytearray()
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(body)


async def run(instances: int, entitlements: int, runs: int) -> None:
    etcd = EtcdServer().start()
    try:
        store = await connect(etcd.endpoints)
        app = create_app(store, ApiSettings(server_name="bench"))
        async with app.router.lifespan_context(app):
            for i in range(instances):
                record = {"name": f"c{i:03d}", "project": "default", "profiles": ["default"],
                          "config": {"user.n": str(i)}, "devices": {}, "type": "container",
                          "status": "Stopped", "architecture": "x86_64"}  # fmt: skip
                await store.put(
                    f"/croft/records/instances/default/c{i:03d}", json.dumps(record).encode()
                )
            # Every instance granted one by one (so that both callers are shown the same
            # list), the rest of the entitlements on instances of other projects.
            permissions = [
                {"entity_type": "instance", "url": instance("default", f"c{i:03d}").url,
                 "entitlement": "user"}
                for i in range(instances)
            ]  # fmt: skip
            permissions += [
                {"entity_type": "instance", "url": instance(f"p{i % 50}", f"x{i}").url,
                 "entitlement": "operator"}
                for i in range(entitlements - len(permissions))
            ]  # fmt: skip
            await store.put(
                group_key("users"),
                json.dumps({"name": "users", "permissions": permissions}).encode(),
            )
            await store.put(
                identity_key("tls", HELD.fingerprint),
                json.dumps({"id": HELD.fingerprint, "groups": ["users"]}).encode(),
            )
            app.state.croft.authorizer.changed()

            who = {"id": FREE}

            async def as_caller(scope: Any) -> Identity:
                return who["id"]

            auth.tls_identity = as_caller  # type: ignore[assignment]

            async def timed(identity: Identity) -> tuple[list[float], int, bytes]:
                who["id"] = identity
                samples = []
                status, body = 0, b""
                for _ in range(runs):
                    started = time.perf_counter()
                    status, body = await _request(app, "/1.0/instances", "recursion=1")
                    samples.append(time.perf_counter() - started)
                return samples, status, body

            await timed(FREE)  # warm up both paths
            await timed(HELD)
            # Interleaved, so that the machine's other load falls on both alike.
            free, held = [], []
            for _ in range(runs):
                for identity, samples in ((FREE, free), (HELD, held)):
                    who["id"] = identity
                    started = time.perf_counter()
                    status, body = await _request(app, "/1.0/instances", "recursion=1")
                    samples.append(time.perf_counter() - started)
                    if identity is FREE:
                        free_status, free_body = status, body
                    else:
                        held_status, held_body = status, body
            assert free_status == held_status == 200
            shown_free = len(json.loads(free_body)["metadata"])
            shown_held = len(json.loads(held_body)["metadata"])
            cold = []
            for _ in range(20):
                app.state.croft.authorizer.changed()
                who["id"] = HELD
                started = time.perf_counter()
                await _request(app, "/1.0/instances", "recursion=1")
                cold.append(time.perf_counter() - started)

            state = await app.state.croft.authorizer.state()
            grants = state.grants_of(HELD)
            assert grants is not None
            target = instance("default", "c000")
            one = (
                min(
                    timeit.repeat(
                        lambda: grants.allows("can_view", target), number=10_000, repeat=5
                    )
                )
                / 10_000
            )
            urls = [records.url("instances", f"c{i:03d}") for i in range(instances)]

            def request_checks() -> int:
                """What a held request adds: its rule and question, then the list's."""
                rule = rule_for("GET", "/1.0/instances", "default")
                assert rule is not None
                return sum(viewable(grants, url, "default") for url in urls)

            work = min(timeit.repeat(request_checks, number=200, repeat=5)) / 200

            def ms(values: list[float], q: float = 0.5) -> float:
                return (
                    statistics.quantiles(values, n=100)[int(q * 100) - 1] * 1000
                    if q != 0.5
                    else statistics.median(values) * 1000
                )

            print(
                f"GET /1.0/instances?recursion=1, {instances} instances, {len(permissions)} entitlements, {runs} runs each"
            )
            print(
                f"  no group (full access):  median {ms(free):6.3f} ms  p99 {ms(free, 0.99):6.3f} ms  ({shown_free} shown)"
            )
            print(
                f"  held to its groups:      median {ms(held):6.3f} ms  p99 {ms(held, 0.99):6.3f} ms  ({shown_held} shown)"
            )
            added = ms(held) - ms(free)
            print(
                f"  added by authorization:  {added:6.3f} ms (median)   target < 1 ms: "
                f"{added:.3f}/1 = {added:.2f}x of the target, {'met' if added < 1 else 'NOT met'}"
            )
            print(
                f"  first request after a change (records read, grants rebuilt): median {ms(cold):6.3f} ms"
            )
            print(
                f"  the checks alone (rule + {instances} can_view, best of 5x200): {work * 1000:.3f} ms"
                f" ({work * 1000:.2f}x of the 1 ms target, {'met' if work < 0.001 else 'NOT met'})"
            )
            print(f"  one Grants.allows (remembered): {one * 1e6:.2f} us")
        await store.close()
    finally:
        etcd.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--entitlements", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=400)
    args = parser.parse_args()
    asyncio.run(run(args.instances, args.entitlements, args.runs))


if __name__ == "__main__":
    main()
