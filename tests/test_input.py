"""A client that misbehaves (issue 21): bodies of the right shape with wrong types, odd
strings (lone surrogates, NUL, control characters, huge ones), deep nesting, huge
integers and missing fields, sent to every writable endpoint of one real croft.

Whatever arrives, croft answers in LXD's envelope and never with a 5xx (501 only where
croft has no such endpoint yet); every operation it starts ends; a refused request
leaves no record behind and changes none. The fuzzing is hypothesis's, derandomized
(the same examples on every run) with a fixed count per endpoint (60), which
bounds its time (about half a minute here, with the croft it starts). Then the wrong
answers LXD gets right, one test each.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from croft.common.store import Store
from croft.common.testing.waiting import UnixHTTPConnection

from .conftest import Croft, Lxc

INSTANCE = "fz"
PROFILE = "fzp"
ALIAS = "fz-alias"
RECORDS = "/croft/records/"
# Fields a record's own life changes (its state, when it was used): not the client's.
LIVE_FIELDS = ("status", "status_code", "last_used_at", "_croft", "ipv4", "ipv6")

# About what the HTTP server's parser takes of a request line (measured: 64 KiB).
MAX_REQUEST_LINE = 64 * 1024

EXAMPLES = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


# ---------------------------------------------------------------------------- a client


@dataclass
class Answer:
    status: int
    body: Any
    raw: bytes

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.raw[:500]!r})"


@dataclass
class Client:
    """http.client on croft's unix socket, and a store connection to see its records."""

    socket_path: Path
    store: Store
    loop: asyncio.AbstractEventLoop

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        conn = UnixHTTPConnection(self.socket_path, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            reply = conn.getresponse()
            raw = reply.read()
        finally:
            conn.close()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return Answer(reply.status, parsed, raw)

    def json(self, method: str, path: str, body: Any = None) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        return self.send(method, path, data, {"Content-Type": "application/json"})

    def wait(self, operation: str) -> dict[str, Any]:
        answer = self.send("GET", f"{operation}/wait?timeout=120")
        assert answer.status == 200, answer
        op: dict[str, Any] = answer.body["metadata"]
        return op

    def records(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            return {e.key: e.json() for e in await self.store.list(RECORDS)}

        return self.loop.run_until_complete(read())


def quiet(record: Any) -> Any:
    if isinstance(record, dict):
        return {k: quiet(v) for k, v in record.items() if k not in LIVE_FIELDS}
    return record


@pytest.fixture(scope="module")
def client(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> Iterator[Client]:
    croft, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("launch", "busybox", INSTANCE)
    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(croft.connect())
    try:
        yield Client(croft.root / "state" / "unix.socket", store, loop)
    finally:
        loop.run_until_complete(store.close())
        loop.close()


# ---------------------------------------------------------------------------- strategies

# Text JSON cannot carry as it is: markers, put in place after json.dumps.
RAW = {
    "@@bignum@@": "9" * 5000,
    "@@huge-int@@": str(2**64),
    "@@nan@@": "NaN",
    "@@inf@@": "1e400",
    "@@deep33@@": "[" * 33 + "]" * 33,
    "@@deep@@": "[" * 100_000 + "]" * 100_000,
}


class Long(str):
    """A long string that says how long it is, rather than itself, in a failure report."""

    def __repr__(self) -> str:
        return f"Long({self[:1]!r} * {len(self)})"


odd_text = st.sampled_from(
    [
        "\ud800",
        "a\udfffb",
        "a\x00b",
        "\x00",
        "\x01\x1f\x7f",
        "..",
        ".",
        "/",
        "a/b",
        " ",
        "",
        "\u202eevil",
        "é" * 40,
        "😀",
        Long("x" * 300),
        Long("x" * (70 * 1024)),
        Long("y" * (300 * 1024)),
        Long("z" * (1100 * 1024)),
    ]
) | st.text(max_size=40)

huge_int = st.sampled_from(
    [-1, 2**31, -(2**31) - 1, 2**32, 2**63, -(2**63) - 1, 10**20, 1.5, "@@huge-int@@", "@@bignum@@"]
)
raw_value = st.sampled_from(["@@nan@@", "@@inf@@", "@@deep33@@", "@@deep@@"])
scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | odd_text
wrong = st.recursive(
    scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def odd_map(values: st.SearchStrategy[Any] = odd_text) -> st.SearchStrategy[Any]:
    return st.dictionaries(odd_text | st.sampled_from(["user.a", "limits.cpu"]), values, max_size=3)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One field's value: valid, of a wrong type, an odd string, a huge number, deep."""
    return valid | wrong | odd_text | huge_int | raw_value


MISSING = object()


def body_of(
    fields: dict[str, st.SearchStrategy[Any]],
    fixed: dict[str, st.SearchStrategy[Any]] | None = None,
) -> st.SearchStrategy[bytes]:
    """An LXD-shaped JSON body: each field present (odd or not) or missing; now and then
    no object at all, bad JSON or bytes that are not UTF-8. `fixed` fields are drawn from
    their strategy as it is, when some values must never be sent."""
    chosen = {name: st.just(MISSING) | field(valid) for name, valid in fields.items()}
    chosen.update({name: st.just(MISSING) | values for name, values in (fixed or {}).items()})
    shaped = st.fixed_dictionaries(chosen).map(
        lambda d: {k: v for k, v in d.items() if v is not MISSING}
    )
    whole = st.sampled_from(
        [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe{}", b'{"a": 1} trailing', b"@@deep@@"]
    )
    return st.one_of(shaped.map(encode), shaped.map(encode), shaped.map(encode), whole.map(raw))


def encode(body: Any) -> bytes:
    text = json.dumps(body)  # surrogates go as \\ud800 escapes, as a client sends them
    for marker, value in RAW.items():
        text = text.replace(json.dumps(marker), value)
    return text.encode()


def raw(body: bytes) -> bytes:
    return RAW["@@deep@@"].encode() if body == b"@@deep@@" else body


names = st.sampled_from(["fz-new", "fz-new2"]) | odd_text
configs = odd_map() | st.just({"user.fuzz": "1"})
devices = st.dictionaries(
    odd_text | st.just("fzdev"),
    odd_map()
    | st.just({"type": "nic", "network": "no-such-network", "name": "eth9"})
    | st.just({"type": "unix-char", "path": "/dev/fuzz\x00"})
    | odd_text.map(lambda text: {"type": "disk", "path": "/mnt", "source": "/" + text}),
    max_size=2,
)


# ---------------------------------------------------------------------------- the checks


def check_envelope(answer: Answer, allow_501: bool = False, raw_ok: bool = False) -> None:
    """LXD's envelope, never a 5xx (but 501 where croft has no such endpoint); `raw_ok`:
    a success may be a file's bytes."""
    assert answer.status < 500 or (allow_501 and answer.status == 501), answer
    if raw_ok and answer.status < 400 and answer.body is None:
        return
    assert isinstance(answer.body, dict), answer
    if answer.status >= 400:
        assert answer.body["type"] == "error", answer
        assert answer.body["error_code"] == answer.status, answer
        assert isinstance(answer.body["error"], str) and answer.body["error"], answer
    else:
        assert answer.body["type"] in ("sync", "async"), answer


def exercise(
    client: Client,
    method: str,
    path: str,
    body: bytes | None,
    *,
    headers: dict[str, str] | None = None,
    watch: tuple[str, ...] = (),
    allow_501: bool = False,
    raw_ok: bool = False,
    cleanup: Callable[[Client], None] | None = None,
) -> Answer:
    """Send one request and hold croft to the promises: an envelope, no 5xx; an
    operation that ends; after a refusal no record more or less, and the records under
    `watch` unchanged."""
    if len(path) > MAX_REQUEST_LINE:
        # Refused by the HTTP server's parser before croft sees it: a plain 400.
        answer = client.send("GET", path)
        assert answer.status == 400, answer
        return answer
    before = client.records()
    answer = client.send(
        method, path, body, {"Content-Type": "application/json", **(headers or {})}
    )
    check_envelope(answer, allow_501, raw_ok)
    event(f"{method} {answer.status}")  # what the examples reached: --hypothesis-show-statistics
    refused = answer.status >= 400
    if answer.status == 202:
        op = client.wait(answer.body["operation"])
        assert op["status"] in ("Success", "Failure", "Cancelled"), op
        event(f"operation {op['status']}")
        refused = op["status"] != "Success"  # a failed operation changes nothing either
    if refused:
        after = client.records()
        assert sorted(after) == sorted(before), (answer, set(after) ^ set(before))
        for key in watch:
            assert quiet(after.get(key)) == quiet(before.get(key)), (answer, key)
    elif cleanup is not None:
        cleanup(client)
    return answer


def remove_new(kind: str, url: str) -> Callable[[Client], None]:
    """Undo an accepted create: delete what is new under `kind`."""

    def undo(client: Client) -> None:
        for key in client.records():
            prefix = f"{RECORDS}{kind}/default/"
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if name not in KEEP.get(kind, ()):
                    answer = client.send("DELETE", f"{url}/{quote(name, safe='')}")
                    if answer.status == 202:
                        client.wait(answer.body["operation"])

    return undo


def remove_fuzzed_networks(client: Client) -> None:
    """Undo an accepted network create (only the fuzzer's names can be new)."""
    for name in ("fz-new", "fz-new2"):
        client.send("DELETE", f"/1.0/networks/{name}")


KEEP = {
    "profiles": ("default", PROFILE),
    "image-aliases": ("busybox", ALIAS),
    "instances": (INSTANCE,),
}


# ---------------------------------------------------------------------------- the fuzzing


@EXAMPLES
@given(
    body=body_of(
        {
            "name": names,
            "description": odd_text,
            "config": configs,
            "devices": devices,
            "profiles": st.just(["default"]) | st.lists(odd_text, max_size=2),
            "source": st.fixed_dictionaries({"type": st.just("image"), "alias": st.just("busybox")})
            | odd_map(),
            "ephemeral": st.booleans(),
            "type": st.just("container") | odd_text,
            "instance_type": odd_text,
        }
    )
)
@example(body=b'{"name": "fz-new", "source": {"type": "none"}, "config": {"user.a": "\\ud800"}}')
def test_fuzz_instances_post(client: Client, body: bytes) -> None:
    exercise(
        client, "POST", "/1.0/instances", body, cleanup=remove_new("instances", "/1.0/instances")
    )


@EXAMPLES
@given(
    body=body_of(
        {
            # Actions that cost little, and are undone below when one gets through.
            "action": st.sampled_from(["freeze", "unfreeze"]) | odd_text,
            "timeout": huge_int | wrong,
            "force": wrong,
            "stateful": wrong,
        }
    )
)
@example(body=b'{"action": "stop", "timeout": 2147483648}')
def test_fuzz_instance_state(client: Client, body: bytes) -> None:
    answer = exercise(client, "PUT", f"/1.0/instances/{INSTANCE}/state", body)
    if answer.status == 202:  # a fitting body slipped through: put the instance back
        state = client.send("GET", f"/1.0/instances/{INSTANCE}/state").body["metadata"]
        action = {"Stopped": "start", "Frozen": "unfreeze"}.get(state["status"])
        if action:
            put = client.json("PUT", f"/1.0/instances/{INSTANCE}/state", {"action": action})
            client.wait(put.body["operation"])


# The command's first word never names a program that could run on: "/nonexistent/"
# before it, unless it is one of these.
commands = st.lists(odd_text, max_size=3).map(
    lambda argv: [f"/nonexistent/{argv[0]}", *argv[1:]] if argv else argv
) | st.sampled_from([["true"], ["false"], ["echo", "\ud800"], ["true", "a\x00b"]])


@EXAMPLES
@given(
    body=body_of(
        {
            "command": commands,
            "environment": odd_map(),
            "cwd": odd_text,
            "user": huge_int,
            "group": huge_int,
            "width": huge_int,
            "height": huge_int,
            "record-output": st.booleans(),
        },
        # Never an exec that waits for websockets nobody opens, or a pty nobody reads:
        # those end when their websockets time out, which is not this test's business.
        fixed={
            "wait-for-websocket": st.just(False) | odd_text | huge_int,
            "interactive": st.just(False) | odd_text | huge_int,
        },
    )
)
@example(body=b'{"command": ["true"], "user": -1}')
@example(body=b'{"command": ["true"], "width": 4294967296}')
def test_fuzz_exec(client: Client, body: bytes) -> None:
    exercise(client, "POST", f"/1.0/instances/{INSTANCE}/exec", body)


@EXAMPLES
@given(
    path=odd_text | st.just("/tmp/fz"),
    uid=st.sampled_from(["0", "-1", "-2", str(2**32), str(2**64), "x", "1e3", ""]),
    mode=st.sampled_from(["0644", "-1", "77777", "999", "0x1", ""]),
    content=st.binary(max_size=64),
)
@example(path="/etc/x\x00y", uid="0", mode="0644", content=b"x")
@example(path="/tmp/fz", uid=str(2**64), mode="0644", content=b"x")
def test_fuzz_files(client: Client, path: str, uid: str, mode: str, content: bytes) -> None:
    url = f"/1.0/instances/{INSTANCE}/files?path={quote(path.encode('utf-8', 'surrogatepass'))}"
    headers = {"X-LXD-uid": uid, "X-LXD-gid": uid, "X-LXD-mode": mode, "X-LXD-type": "file"}
    exercise(client, "POST", url, content, headers=headers)
    exercise(client, "GET", url, None, raw_ok=True)


@EXAMPLES
@given(
    body=body_of({"name": names, "stateful": wrong, "expires_at": odd_text}),
)
def test_fuzz_snapshots(client: Client, body: bytes) -> None:
    watch = (f"{RECORDS}instances/default/{INSTANCE}",)
    exercise(client, "POST", f"/1.0/instances/{INSTANCE}/snapshots", body, watch=watch)
    # Whatever was accepted goes again, so that the next example starts from none.
    url = f"/1.0/instances/{INSTANCE}/snapshots"
    for snap in client.send("GET", f"{url}?recursion=1").body["metadata"]:
        answer = client.send("DELETE", f"{url}/{quote(snap['name'], safe='')}")
        client.wait(answer.body["operation"])


@EXAMPLES
@given(
    method=st.sampled_from(["PUT", "PATCH"]),
    body=body_of(
        {
            "config": configs,
            "devices": devices,
            "profiles": st.just(["default"]) | st.lists(odd_text, max_size=2),
            "description": odd_text,
            "architecture": odd_text,
            "restore": odd_text,
        },
        # An ephemeral instance would be gone at its next stop.
        fixed={"ephemeral": st.just(False) | odd_text | huge_int},
    ),
)
def test_fuzz_instance_update(client: Client, method: str, body: bytes) -> None:
    key = f"{RECORDS}instances/default/{INSTANCE}"
    exercise(client, method, f"/1.0/instances/{INSTANCE}", body, watch=(key,))


profile_fields = {
    "name": names,
    "description": odd_text,
    "config": configs,
    "devices": devices,
}


@EXAMPLES
@given(body=body_of(profile_fields))
@example(body=encode({"name": "fz-big", "description": "x" * (2 * 1024 * 1024)}))
@example(body=b'{"name": "fz-\\ud800"}')
def test_fuzz_profiles_post(client: Client, body: bytes) -> None:
    exercise(client, "POST", "/1.0/profiles", body, cleanup=remove_new("profiles", "/1.0/profiles"))


@EXAMPLES
@given(method=st.sampled_from(["PUT", "PATCH", "POST"]), body=body_of(profile_fields))
def test_fuzz_profile_update(client: Client, method: str, body: bytes) -> None:
    if client.send("GET", f"/1.0/profiles/{PROFILE}").status == 404:
        assert client.json("POST", "/1.0/profiles", {"name": PROFILE}).status == 201
    key = f"{RECORDS}profiles/default/{PROFILE}"
    exercise(
        client,
        method,
        f"/1.0/profiles/{PROFILE}",
        body,
        watch=(key,),
        cleanup=remove_new("profiles", "/1.0/profiles"),
    )


@EXAMPLES
@given(
    body=body_of({"name": names, "target": st.just("busybox") | odd_text, "description": odd_text})
)
@example(body=encode({"name": "a" * (1024 * 1024), "target": "busybox"}))
@example(body=encode({"name": "a" * (200 * 1024), "target": "busybox"}))
def test_fuzz_aliases(client: Client, body: bytes) -> None:
    exercise(
        client,
        "POST",
        "/1.0/images/aliases",
        body,
        cleanup=remove_new("image-aliases", "/1.0/images/aliases"),
    )


def busybox_fingerprint(client: Client) -> str:
    return str(client.send("GET", "/1.0/images/aliases/busybox").body["metadata"]["target"])


@EXAMPLES
@given(
    method=st.sampled_from(["PUT", "PATCH"]),
    body=body_of(
        {
            "properties": odd_map(),
            "public": wrong,
            "auto_update": wrong,
            "expires_at": odd_text,
            "profiles": st.lists(odd_text, max_size=2),
        }
    ),
)
def test_fuzz_images(client: Client, method: str, body: bytes) -> None:
    fingerprint = busybox_fingerprint(client)
    key = f"{RECORDS}images/default/{fingerprint}"
    exercise(client, method, f"/1.0/images/{fingerprint}", body, watch=(key,))


@EXAMPLES
@given(
    body=body_of(
        {
            "name": names,
            "type": st.just("client") | odd_text,
            "certificate": odd_text,
            "password": odd_text,
            "restricted": wrong,
            "projects": st.lists(odd_text, max_size=2),
        },
        # A token request that fits would leave a token: not a refusal.
        fixed={"token": st.just(False) | odd_text | huge_int},
    )
)
def test_fuzz_certificates(client: Client, body: bytes) -> None:
    exercise(client, "POST", "/1.0/certificates", body)


@EXAMPLES
@given(method=st.sampled_from(["PUT", "PATCH"]), body=body_of({"config": odd_map()}))
def test_fuzz_server_config(client: Client, method: str, body: bytes) -> None:
    exercise(client, method, "/1.0", body, watch=(f"{RECORDS}server/config",))


@EXAMPLES
@given(
    path=st.sampled_from(["/1.0/networks", "/1.0/storage-pools", "/1.0/projects"]),
    body=body_of({"name": names, "type": odd_text, "driver": odd_text, "config": odd_map()}),
)
def test_fuzz_networks_pools_projects(client: Client, path: str, body: bytes) -> None:
    # A network that fits is made (a bridge): it goes again, so that the next example
    # starts from the same records.
    cleanup = remove_fuzzed_networks if path == "/1.0/networks" else None
    exercise(client, "POST", path, body, allow_501=True, cleanup=cleanup)


VOLUMES = "/1.0/storage-pools/default/volumes/custom"
VOLUME = "fz-vol"


def remove_new_volumes(client: Client) -> None:
    prefix = f"{RECORDS}storage-volumes/default/default/custom/"
    for key in client.records():
        name = key[len(prefix) :] if key.startswith(prefix) else ""
        if name and "/" not in name and name != VOLUME:
            client.send("DELETE", f"{VOLUMES}/{quote(name, safe='')}")


@EXAMPLES
@given(
    body=body_of(
        {
            "name": names,
            "type": odd_text,
            "description": odd_text,
            "content_type": st.just("block") | odd_text,
            "config": odd_map() | st.just({"size": "1MiB"}),
            "source": odd_map(),
        }
    )
)
def test_fuzz_custom_volumes(client: Client, body: bytes) -> None:
    exercise(client, "POST", VOLUMES, body, cleanup=remove_new_volumes)


@EXAMPLES
@given(
    method=st.sampled_from(["PUT", "PATCH", "POST"]),
    target=st.sampled_from(["", "/snapshots", "/snapshots/s0"]),
    body=body_of(
        {
            "name": names,
            "pool": odd_text,
            "description": odd_text,
            "restore": odd_text,
            "expires_at": odd_text,
            "config": odd_map() | st.just({"size": "abc"}),
        }
    ),
)
def test_fuzz_a_custom_volume(client: Client, method: str, target: str, body: bytes) -> None:
    if client.send("GET", f"{VOLUMES}/{VOLUME}").status == 404:
        assert client.json("POST", VOLUMES, {"name": VOLUME}).status == 200
    if target == "/snapshots" and method != "POST":
        method = "POST"
    answer = exercise(client, method, f"{VOLUMES}/{VOLUME}{target}", body, watch=(), allow_501=True)
    if answer.status < 400 and method == "POST" and target != "/snapshots":
        # A rename or a move went through: bring the name back for the next example.
        for name in [r.get("name") for r in volume_records(client)]:
            if name and "/" not in name and name != VOLUME:
                client.send("DELETE", f"{VOLUMES}/{quote(name, safe='')}")


def volume_records(client: Client) -> list[dict[str, Any]]:
    prefix = f"{RECORDS}storage-volumes/default/default/custom/"
    return [r for k, r in client.records().items() if k.startswith(prefix)]


COLLECTIONS = (
    "instances",
    "containers",
    "profiles",
    "networks",
    "storage-pools",
    "projects",
    "images",
    "images/aliases",
    "certificates",
    "operations",
    f"instances/{INSTANCE}/snapshots",
    "storage-pools/default/volumes/custom",
)


@EXAMPLES
@given(
    collection=st.sampled_from(COLLECTIONS),
    name=odd_text.filter(lambda n: n not in ("", "/")),
    method=st.sampled_from(["GET", "PUT", "PATCH", "POST", "DELETE"]),
)
@example(collection="networks", name="..", method="GET")
def test_fuzz_names_in_paths(client: Client, collection: str, name: str, method: str) -> None:
    path = f"/1.0/{collection}/{quote(name.encode('utf-8', 'surrogatepass'), safe='')}"
    answer = exercise(client, method, path, b"{}", allow_501=True)
    if name in (".", ".."):
        # No object has such a name: LXD's 404 (or 501 for a method croft lacks).
        assert answer.status in (404, 501), answer


def test_fuzzing_left_every_operation_ended(client: Client) -> None:
    running = client.send("GET", "/1.0/operations?recursion=1").body["metadata"]
    assert not (running or {}).get("running"), running


# ---------------------------------------------------------------------------- wrong answers


def test_twenty_concurrent_patches_of_one_instance_all_apply(client: Client) -> None:
    def patch(i: int) -> dict[str, Any]:
        answer = client.json("PATCH", f"/1.0/instances/{INSTANCE}", {"config": {f"user.p{i}": "x"}})
        assert answer.status == 202, answer
        return client.wait(answer.body["operation"])

    with ThreadPoolExecutor(20) as pool:
        ops = list(pool.map(patch, range(20)))
    assert [op["status"] for op in ops] == ["Success"] * 20, [op["err"] for op in ops]
    config = client.send("GET", f"/1.0/instances/{INSTANCE}").body["metadata"]["config"]
    assert {f"user.p{i}" for i in range(20)} <= set(config)


def test_a_patch_with_a_stale_if_match_is_still_refused(client: Client) -> None:
    before = client.send("GET", f"/1.0/instances/{INSTANCE}").body["metadata"]["config"]
    answer = client.send(
        "PATCH",
        f"/1.0/instances/{INSTANCE}",
        json.dumps({"config": {"user.stale": "x"}}).encode(),
        {"If-Match": '"0123"'},
    )
    assert answer.status == 412, answer
    assert client.send("GET", f"/1.0/instances/{INSTANCE}").body["metadata"]["config"] == before


def test_a_profile_nic_on_a_missing_network_is_refused(client: Client) -> None:
    body = {
        "name": "fz-nic",
        "devices": {"eth0": {"type": "nic", "network": "nosuch", "name": "eth0"}},
    }
    answer = client.json("POST", "/1.0/profiles", body)
    assert answer.status == 400, answer
    assert 'Failed to load network "nosuch"' in answer.body["error"]
    assert client.send("GET", "/1.0/profiles/fz-nic").status == 404


def test_a_stateful_snapshot_is_refused(client: Client) -> None:
    answer = client.json(
        "POST", f"/1.0/instances/{INSTANCE}/snapshots", {"name": "s", "stateful": True}
    )
    assert answer.status == 400, answer
    assert answer.body["error"].startswith("Unable to create a stateful snapshot")
    assert client.send("GET", f"/1.0/instances/{INSTANCE}/snapshots").body["metadata"] == []


@pytest.mark.parametrize(
    "collection", ["networks", "profiles", "instances", "storage-pools", "projects"]
)
def test_dot_dot_names_nothing(client: Client, collection: str) -> None:
    for name in ("..", "%2e%2e", "."):
        answer = client.send("GET", f"/1.0/{collection}/{name}")
        assert answer.status == 404, answer
        assert answer.body["error"].endswith("not found"), answer
