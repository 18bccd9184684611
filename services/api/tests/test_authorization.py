"""Fine-grained authorization over HTTPS, as LXD's `/1.0/auth` API: a TLS certificate
put in a group is held to that group's permissions from its next request, sees only what
it may view, and is answered LXD's generic 403 "Forbidden" / 404 "Not Found" otherwise;
root on the socket and certificates in no group keep full access."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import yaml

from croft.api import auth, trust_password
from croft.api.identity import Identity
from croft.api.tls import certificate_fingerprint

from . import test_https
from .test_https import Croft

croft = test_https.croft  # the fixture: a replica serving HTTPS, and the auth service


def put_instance(croft: Croft, project: str, name: str) -> None:
    record = {"name": name, "project": project, "profiles": ["default"], "config": {},
              "devices": {}, "type": "container", "status": "Stopped"}  # fmt: skip
    croft.replica.run(
        croft.replica.ctx.store.put(
            f"/croft/records/instances/{project}/{name}", json.dumps(record).encode()
        )
    )


def names(reply: Any) -> list[str]:
    assert reply.status == 200, (reply.status, reply.raw)
    return sorted(str(u).rsplit("/", 1)[1].partition("?")[0] for u in reply.metadata)


def perm(entity_type: str, url: str, entitlement: str) -> dict[str, str]:
    return {"entity_type": entity_type, "url": url, "entitlement": entitlement}


def test_a_certificate_in_a_group_is_held_to_its_permissions(croft: Croft) -> None:
    root = croft.replica
    for project in ("pa", "pb"):
        assert root.request("POST", "/1.0/projects", {"name": project}).status == 201
    for project, name in (("pa", "c1"), ("pa", "c2"), ("pb", "c1"), ("pb", "secret")):
        put_instance(croft, project, name)
    dev = croft.client("dev")
    croft.lxc("config", "trust", "add", str(dev.cert))
    fingerprint = certificate_fingerprint(dev.cert.read_text())
    # In no group: today's full access.
    assert names(dev.request("GET", "/1.0/instances?project=pb")) == ["c1", "secret"]

    created = root.request("POST", "/1.0/auth/groups", {
        "name": "pa-ops", "description": "operate pa",
        "permissions": [perm("project", "/1.0/projects/pa", "operator")]})  # fmt: skip
    assert (created.status, created.headers["Location"]) == (201, "/1.0/auth/groups/pa-ops")
    assert root.request("PUT", f"/1.0/auth/identities/tls/{fingerprint}",
                        {"groups": ["pa-ops"]}).status == 200  # fmt: skip

    # From the next request on, pa only.
    assert names(dev.request("GET", "/1.0/instances?project=pa")) == ["c1", "c2"]
    assert names(dev.request("GET", "/1.0/instances?project=pb")) == []
    every = dev.request("GET", "/1.0/instances?all-projects=true&recursion=1").metadata
    assert sorted((i["project"], i["name"]) for i in every) == [("pa", "c1"), ("pa", "c2")]
    assert names(dev.request("GET", "/1.0/projects")) == ["pa"]
    assert names(root.request("GET", "/1.0/instances?all-projects=true")) == [
        "c1", "c1", "c2", "secret"]  # fmt: skip
    for method, path, status, error in (
        ("GET", "/1.0/instances/secret?project=pb", 404, "Not Found"),
        ("GET", "/1.0/projects/pb", 404, "Not Found"),
        ("DELETE", "/1.0/instances/c1?project=pb", 404, "Not Found"),
        ("POST", "/1.0/instances?project=pb", 404, "Not Found"),
        ("PUT", "/1.0/projects/pa", 403, "Forbidden"),  # operator of pa, not its editor
        ("PATCH", "/1.0", 403, "Forbidden"),
        ("POST", "/1.0/projects", 403, "Forbidden"),
        ("POST", "/1.0/auth/groups", 403, "Forbidden"),
        ("GET", "/1.0/auth/permissions", 403, "Forbidden"),
        ("POST", "/1.0/storage-pools", 403, "Forbidden"),
    ):
        reply = dev.request(method, path, {"name": "x", "config": {}})
        assert (reply.status, reply.error) == (status, error), (method, path, reply.raw)
        assert b"secret" not in reply.raw and b"pb" not in reply.raw
    assert dev.request("GET", "/1.0/instances/c1?project=pa").status == 200
    # Its groups are not its to see, but who it is is.
    assert names(dev.request("GET", "/1.0/auth/groups")) == []
    current = dev.request("GET", "/1.0/auth/identities/current").metadata
    assert (current["fine_grained"], current["effective_groups"]) == (True, ["pa-ops"])

    # A second group grants `user` on pb's c1: seen and used, not edited or stopped.
    root.request("POST", "/1.0/auth/groups", {"name": "c1-users", "permissions": [
        perm("instance", "/1.0/instances/c1?project=pb", "user")]})  # fmt: skip
    assert root.request("PATCH", f"/1.0/auth/identities/tls/{fingerprint}",
                        {"groups": ["c1-users"]}).status == 200  # fmt: skip
    assert names(dev.request("GET", "/1.0/instances?project=pb")) == ["c1"]
    for method, path in (
        ("PATCH", "/1.0/instances/c1?project=pb"),
        ("PUT", "/1.0/instances/c1/state?project=pb"),
        ("POST", "/1.0/instances/c1/snapshots?project=pb"),
    ):
        reply = dev.request(method, path, {"config": {"security.privileged": "true"}})
        assert (reply.status, reply.error) == (403, "Forbidden"), (method, path)
    got = root.request("GET", "/1.0/instances/c1?project=pb").metadata
    assert "security.privileged" not in got["config"]

    group = root.request("GET", "/1.0/auth/groups/pa-ops").metadata
    assert group == {
        "name": "pa-ops", "description": "operate pa",
        "permissions": [perm("project", "/1.0/projects/pa", "operator")],
        "identities": {"tls": [fingerprint]}, "identity_provider_groups": [],
    }  # fmt: skip
    # Taking the permission away holds at once.
    assert root.request("PUT", "/1.0/auth/groups/pa-ops", {"permissions": []}).status == 200
    assert names(dev.request("GET", "/1.0/instances?project=pa")) == []
    # A rename follows into the membership; a delete takes it away.
    assert root.request("POST", "/1.0/auth/groups/pa-ops", {"name": "pa-ops2"}).status == 201
    ident = root.request("GET", f"/1.0/auth/identities/tls/{fingerprint}").metadata
    assert ident["groups"] == ["pa-ops2", "c1-users"] and ident["name"] == "dev.crt"
    assert root.request("DELETE", "/1.0/auth/groups/c1-users").status == 200
    assert root.request("DELETE", "/1.0/auth/groups/pa-ops2").status == 200
    # In no group again: full access, as before.
    assert names(dev.request("GET", "/1.0/instances?project=pb")) == ["c1", "secret"]


def test_auth_records_are_checked_as_lxd_checks_them(croft: Croft) -> None:
    root = croft.replica
    for body, status, error in (
        ({"name": ""}, 400, "Group name cannot be empty"),
        ({"name": "a/b"}, 400, "Group name cannot contain a forward slash"),
        ({"name": "a:b"}, 400, "Group name cannot contain a colon"),
        ({"name": "g", "permissions": [perm("instance", "/1.0/profiles/x", "user")]}, 400,
         'Failed parsing permission with entity reference "/1.0/profiles/x": Entity type '
         "does not correspond to entity reference"),
        ({"name": "g", "permissions": [perm("instance", "/1.0/instances/x", "admin")]}, 400,
         'Failed validating group permission with entity reference "/1.0/instances/x" and '
         'entitlement "admin": Entitlement "admin" not defined for entity type "instance"'),
    ):  # fmt: skip
        reply = root.request("POST", "/1.0/auth/groups", body)
        assert (reply.status, reply.error) == (status, error), body
    assert root.request("GET", "/1.0/auth/groups").metadata == []
    assert root.request("POST", "/1.0/auth/groups", {"name": "g"}).status == 201
    again = root.request("POST", "/1.0/auth/groups", {"name": "g"})
    assert (again.status, again.error) == (409, 'Group "g" already exists')
    missing = root.request("GET", "/1.0/auth/groups/nope")
    assert (missing.status, missing.error) == (404, "Group not found")
    bad = root.request("PUT", "/1.0/auth/identities/oidc/someone", {"groups": ["nope"]})
    assert (bad.status, bad.error) == (
        404,
        'Failed to add identity to group "nope": Group not found',
    )

    # An identity provider group maps onto croft groups.
    assert root.request("POST", "/1.0/auth/identity-provider-groups",
                        {"name": "devs", "groups": ["g"]}).status == 201  # fmt: skip
    assert root.request("GET", "/1.0/auth/identity-provider-groups?recursion=1").metadata == [
        {"name": "devs", "groups": ["g"]}]  # fmt: skip
    assert root.request("GET", "/1.0/auth/groups/g").metadata["identity_provider_groups"] == [
        "devs"]  # fmt: skip
    assert root.request("POST", "/1.0/auth/identity-provider-groups", {"name": "ops"}).status == 201
    taken = root.request("POST", "/1.0/auth/identity-provider-groups/devs", {"name": "ops"})
    assert (taken.status, taken.error) == (409, 'Identity provider group "ops" already exists')
    renamed = root.request("POST", "/1.0/auth/identity-provider-groups/devs", {"name": "corp"})
    assert (renamed.status, renamed.headers["Location"]) == (
        201, "/1.0/auth/identity-provider-groups/corp")  # fmt: skip
    assert root.request("GET", "/1.0/auth/identity-provider-groups?recursion=1").metadata == [
        {"name": "corp", "groups": ["g"]}, {"name": "ops", "groups": []}]  # fmt: skip
    assert root.request("DELETE", "/1.0/auth/identity-provider-groups/ops").status == 200
    # An OIDC user may be put in a group before it first logs in.
    assert root.request("PUT", "/1.0/auth/identities/oidc/sub-1", {"groups": ["g"]}).status == 200
    listed = root.request("GET", "/1.0/auth/identities/oidc?recursion=1").metadata
    assert [(i["id"], i["groups"]) for i in listed] == [("sub-1", ["g"])]
    assert root.request("DELETE", "/1.0/auth/identities/oidc/sub-1").status == 200

    # The permissions there are to grant.
    perms = root.request("GET", "/1.0/auth/permissions?entity-type=server").metadata
    assert perm("server", "/1.0", "admin") in perms and perm("server", "/1.0", "viewer") in perms
    root.request("PUT", "/1.0/auth/groups/g", {"permissions": [perm("server", "/1.0", "viewer")]})
    held = root.request("GET", "/1.0/auth/permissions?entity-type=server&recursion=1").metadata
    assert {**perm("server", "/1.0", "viewer"), "groups": ["g"]} in held


def test_guessed_trust_tokens_are_rate_limited(
    croft: Croft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token with a guessed secret is refused, and after a few from one address even a
    good token is, for a while: nothing is added."""
    monkeypatch.setattr(trust_password, "attempts", trust_password.PasswordAttempts())
    good = croft.lxc("config", "trust", "add", "--name", "ci", "-q").stdout.strip()
    guess = base64.b64encode(json.dumps({**json.loads(base64.b64decode(good)),
                                         "secret": "0" * 64}).encode()).decode()  # fmt: skip
    guesser = croft.client("guesser")
    for _ in range(trust_password.MAX_FAILURES):
        refused = guesser.request("POST", "/1.0/certificates", {"password": guess})
        assert refused.status in (403, 404), refused
    refused = guesser.request("POST", "/1.0/certificates", {"password": good})
    assert (refused.status, refused.error) == (
        403, "Too many failed trust token attempts, try again later")  # fmt: skip
    assert croft.lxc("config", "trust", "list", "--format", "json").stdout.strip() == "[]"


def test_lifecycle_events_name_who_acted(croft: Croft) -> None:
    """A change made by a certificate held to grants carries its fingerprint as the
    event's requestor."""
    root = croft.replica
    dev = croft.client("actor")
    croft.lxc("config", "trust", "add", str(dev.cert))
    fingerprint = certificate_fingerprint(dev.cert.read_text())
    root.request("POST", "/1.0/auth/groups", {"name": "pm", "permissions": [
        perm("server", "/1.0", "project_manager")]})  # fmt: skip
    root.request("PUT", f"/1.0/auth/identities/tls/{fingerprint}", {"groups": ["pm"]})
    assert dev.request("POST", "/1.0/projects", {"name": "made"}).status == 201
    assert dev.request("DELETE", "/1.0/instances/x").status == 404  # not an instance manager

    async def created_event() -> dict[str, Any]:
        store = root.ctx.store
        for entry in await store.list("/croft/events/"):
            event = entry.json()
            metadata = event.get("metadata") or {}
            if metadata.get("action") == "project-created":
                return dict(metadata)
        raise AssertionError("no project-created event")

    event = root.run(created_event())
    assert event["requestor"]["username"] == fingerprint
    assert event["requestor"]["protocol"] == "tls"


def test_croft_auth_manages_groups_identities_and_mappings(croft: Croft) -> None:
    """`croft auth ...` on the local socket, as `lxc auth` does it."""
    from click.testing import CliRunner

    from croft.client.cli import main

    dev = croft.client("cli-dev")
    croft.lxc("config", "trust", "add", str(dev.cert))
    fingerprint = certificate_fingerprint(dev.cert.read_text())
    sock = ["--socket", str(croft.replica.socket)]

    def croft_cli(*args: str, ok: bool = True) -> str:
        result = CliRunner().invoke(main, ["auth", *args, *sock])
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    croft_cli("group", "create", "viewers", "--description", "see all")
    croft_cli("group", "permission", "add", "viewers", "server", "viewer")
    croft_cli("group", "permission", "add", "viewers", "instance", "c1", "operator",
              "--project", "pa")  # fmt: skip
    assert "Unknown entity type" in croft_cli("group", "permission", "add", "viewers",
                                               "thing", "x", "viewer", ok=False)  # fmt: skip
    croft_cli("identity", "group", "add", f"tls/{fingerprint}", "viewers")
    made = croft.client("cli-fg")
    croft_cli("identity", "create", "tls/cli-fg", str(made.cert), "--group", "viewers")
    assert yaml.safe_load(croft_cli("identity", "show", "tls/cli-fg"))["groups"] == ["viewers"]
    assert made.request("GET", "/1.0/projects").status == 200
    croft_cli("identity", "delete", "tls/cli-fg")
    assert made.request("GET", "/1.0").metadata["auth"] == "untrusted"
    printed = croft_cli("identity", "create", "tls/cli-pending", "--group", "viewers")
    token = json.loads(base64.b64decode(printed.splitlines()[-1]))
    assert token["client_name"] == "cli-pending" and token["secret"]
    croft_cli("identity", "delete", "tls/cli-pending")
    croft_cli("identity-provider-group", "create", "corp-devs")
    croft_cli("identity-provider-group", "group", "add", "corp-devs", "viewers")
    shown = yaml.safe_load(croft_cli("group", "show", "viewers"))
    assert shown["permissions"] == [
        perm("server", "/1.0", "viewer"),
        perm("instance", "/1.0/instances/c1?project=pa", "operator"),
    ]
    assert shown["identities"] == {"tls": [fingerprint]}
    assert shown["identity_provider_groups"] == ["corp-devs"]
    # The viewer sees the server's projects and may change nothing.
    assert dev.request("GET", "/1.0/projects").status == 200
    assert dev.request("PUT", "/1.0", {"config": {}}).status == 403
    croft_cli("group", "permission", "remove", "viewers", "server", "viewer")
    croft_cli("identity", "group", "remove", f"tls/{fingerprint}", "viewers")
    assert yaml.safe_load(croft_cli("identity", "show", f"tls/{fingerprint}"))["groups"] == []
    croft_cli("group", "rename", "viewers", "watchers")
    assert yaml.safe_load(croft_cli("identity-provider-group", "list")) == [
        {"name": "corp-devs", "groups": ["watchers"]}]  # fmt: skip
    croft_cli("group", "delete", "watchers")
    assert yaml.safe_load(croft_cli("group", "list")) == []
    assert "server\t/1.0\tadmin" in croft_cli("permission", "list", "--entity-type", "server")


def test_an_oidc_user_gets_what_its_provider_groups_map_to(
    croft: Croft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OIDC identity (as the bearer-token login hands it over: method "oidc", the
    token's subject and groups claim), stood in for by a client certificate here, is held
    to the groups its identity provider's groups map to; unmapping holds at once."""
    root = croft.replica
    for project in ("pa", "pb"):
        assert root.request("POST", "/1.0/projects", {"name": project}).status == 201
    for project, name in (("pa", "c1"), ("pb", "c2")):
        put_instance(croft, project, name)
    user = croft.client("oidc-user")
    croft.lxc("config", "trust", "add", str(user.cert))
    fingerprint = certificate_fingerprint(user.cert.read_text())
    as_tls = auth.tls_identity

    async def as_oidc(scope: Any) -> Identity:
        found = await as_tls(scope)
        if found.fingerprint != fingerprint:
            return found
        return Identity("tls", True, method="oidc", subject="sub-ann",
                        name="ann@example.org", groups=("devs",))  # fmt: skip

    monkeypatch.setattr(auth, "tls_identity", as_oidc)
    root.request("POST", "/1.0/auth/groups", {"name": "pa-ops", "permissions": [
        perm("project", "/1.0/projects/pa", "operator")]})  # fmt: skip
    root.request("POST", "/1.0/auth/identity-provider-groups", {"name": "devs",
                                                                 "groups": ["pa-ops"]})  # fmt: skip
    assert names(user.request("GET", "/1.0/instances?project=pa")) == ["c1"]
    assert names(user.request("GET", "/1.0/instances?project=pb")) == []
    assert user.request("PATCH", "/1.0/instances/c1?project=pa", {}).status != 403
    for method, path, status in (
        ("GET", "/1.0/instances/c2?project=pb", 404),
        ("POST", "/1.0/instances?project=pb", 404),
        ("PUT", "/1.0", 403),
    ):
        reply = user.request(method, path, {"name": "x"})
        assert reply.status == status, (method, path, reply)
    current = user.request("GET", "/1.0/auth/identities/current").metadata
    assert current["authentication_method"] == "oidc" and current["id"] == "sub-ann"
    assert current["effective_groups"] == ["pa-ops"]
    # What it changes is its in the event log.
    assert user.request("POST", "/1.0/profiles?project=pa", {"name": "web"}).status == 201

    async def requestor() -> dict[str, Any]:
        for entry in await root.ctx.store.list("/croft/events/"):
            metadata = entry.json().get("metadata") or {}
            if metadata.get("action") == "profile-created":
                return dict(metadata["requestor"])
        raise AssertionError("no profile-created event")

    found = root.run(requestor())
    assert (found["username"], found["protocol"]) == ("ann@example.org", "oidc")
    # The mapping gone, the next request sees nothing (an OIDC user is always held).
    assert root.request("DELETE", "/1.0/auth/identity-provider-groups/devs").status == 200
    assert names(user.request("GET", "/1.0/instances?project=pa")) == []
    assert user.request("GET", "/1.0/instances/c1?project=pa").status == 404


def test_a_restricted_certificate_cannot_touch_the_auth_records(croft: Croft) -> None:
    """A certificate restricted to `default` (whose requests name no other project) may
    not grant anyone anything: groups, identities and mappings are server-wide, as the
    trust store is; it may ask who it is."""
    root = croft.replica
    tenant = croft.client("tenant")
    croft.lxc("config", "trust", "add", str(tenant.cert), "--restricted", "--projects", "default")
    other = croft.client("other")
    croft.lxc("config", "trust", "add", str(other.cert))
    other_fp = certificate_fingerprint(other.cert.read_text())
    assert root.request("POST", "/1.0/auth/groups", {"name": "g"}).status == 201
    for method, path, body in (
        ("POST", "/1.0/auth/groups", {"name": "mine", "permissions": [
            perm("server", "/1.0", "admin")]}),
        ("PUT", "/1.0/auth/groups/g", {"permissions": [perm("server", "/1.0", "admin")]}),
        ("DELETE", "/1.0/auth/groups/g", None),
        ("PUT", f"/1.0/auth/identities/tls/{other_fp}", {"groups": ["g"]}),
        ("PUT", "/1.0/auth/identities/oidc/someone", {"groups": ["g"]}),
        ("POST", "/1.0/auth/identity-provider-groups", {"name": "devs", "groups": ["g"]}),
        ("POST", "/1.0/auth/identities/tls", {"name": "x", "certificate": "x"}),
        ("GET", "/1.0/auth/groups?recursion=1", None),
        ("GET", "/1.0/auth/identities?recursion=1", None),
        ("GET", "/1.0/auth/permissions", None),
    ):  # fmt: skip
        reply = tenant.request(method, path, body)
        assert (reply.status, reply.error) == (403, "not authorized"), (method, path, reply)
    current = tenant.request("GET", "/1.0/auth/identities/current")
    assert current.status == 200 and current.metadata["name"] == "tenant.crt"
    group = root.request("GET", "/1.0/auth/groups/g").metadata
    assert (group["permissions"], group["identities"]) == ([], {})
    assert root.request("GET", "/1.0/auth/groups").metadata == ["/1.0/auth/groups/g"]
    assert root.request("GET", "/1.0/auth/identity-provider-groups").metadata == []


def test_a_tls_identity_created_through_the_auth_api_is_fine_grained(croft: Croft) -> None:
    """`POST /1.0/auth/identities/tls` (LXD's `lxc auth identity create tls/NAME CERT`):
    the certificate is trusted, and held to its groups' grants even while in none."""
    root = croft.replica
    put_instance(croft, "default", "c1")
    dev = croft.client("fg")
    pem = dev.cert.read_text()
    fingerprint = certificate_fingerprint(pem)
    for body, status, error in (
        ({"certificate": pem}, 400, "Identity name must be provided"),
        ({"name": "fg", "certificate": pem, "token": True}, 400,
         "Can't use certificate if token is requested"),
        ({"name": "fg", "trust_token": "x"}, 409, "Client already trusted"),
        ({"name": "fg", "certificate": pem, "groups": ["nope"]}, 404,
         'Failed to add identity to group "nope": Group not found'),
        ({"name": "fg", "certificate": "not a certificate"}, 400, None),
    ):  # fmt: skip
        reply = root.request("POST", "/1.0/auth/identities/tls", body)
        assert reply.status == status, (body, reply)
        assert error is None or reply.error == error, reply.error
    assert root.request("GET", "/1.0/certificates").metadata == []  # nothing was added
    created = root.request("POST", "/1.0/auth/identities/tls", {"name": "fg", "certificate": pem})
    assert created.status == 201, created
    assert created.headers["Location"] == f"/1.0/auth/identities/tls/{fingerprint}"
    again = root.request("POST", "/1.0/auth/identities/tls", {"name": "fg2", "certificate": pem})
    assert (again.status, again.error) == (409, "Identity already exists")
    other = croft.client("fg-other").cert.read_text()
    named = root.request("POST", "/1.0/auth/identities/tls", {"name": "fg", "certificate": other})
    assert (named.status, named.error) == (409, 'An identity with name "fg" already exists')
    shown = root.request("GET", "/1.0/auth/identities/tls/fg").metadata
    assert (shown["type"], shown["id"], shown["groups"]) == ("Client certificate", fingerprint, [])

    # Trusted, in no group: it may do nothing (a `lxc config trust add` one may all).
    info = dev.request("GET", "/1.0").metadata
    assert info["auth"] == "trusted" and info["config"] == {}
    assert names(dev.request("GET", "/1.0/instances")) == []
    assert (dev.request("PUT", "/1.0", {"config": {}}).status) == 403
    current = dev.request("GET", "/1.0/auth/identities/current").metadata
    assert (current["fine_grained"], current["type"]) == (True, "Client certificate")
    made = dev.request("POST", "/1.0/auth/identities/tls", {"name": "x", "certificate": other})
    assert (made.status, made.error) == (403, "Forbidden")
    # Its group's grants, from the next request.
    root.request("POST", "/1.0/auth/groups", {"name": "viewers", "permissions": [
        perm("project", "/1.0/projects/default", "viewer")]})  # fmt: skip
    root.request("PUT", "/1.0/auth/identities/tls/fg", {"groups": ["viewers"]})
    assert names(dev.request("GET", "/1.0/instances")) == ["c1"]
    # Deleted through the auth API: no longer trusted, its record gone.
    assert root.request("DELETE", "/1.0/auth/identities/tls/fg").status == 200
    assert dev.request("GET", "/1.0").metadata["auth"] == "untrusted"
    assert root.request("GET", "/1.0/certificates").metadata == []
    assert root.request("GET", "/1.0/auth/groups/viewers").metadata["identities"] == {}

    # A trust-store certificate deleted takes its memberships with it.
    croft.lxc("config", "trust", "add", str(dev.cert))
    root.request("PUT", f"/1.0/auth/identities/tls/{fingerprint}", {"groups": ["viewers"]})
    croft.lxc("config", "trust", "remove", fingerprint)
    croft.lxc("config", "trust", "add", str(dev.cert))
    assert root.request("GET", f"/1.0/auth/identities/tls/{fingerprint}").metadata["groups"] == []
    assert names(dev.request("GET", "/1.0/instances")) == ["c1"]  # in no group: full access


def test_a_pending_tls_identity_becomes_the_certificate_that_shows_its_token(
    croft: Croft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`POST /1.0/auth/identities/tls` with `token: true` (LXD's `lxc auth identity
    create tls/NAME` with no certificate): a pending identity and a token; the client that
    shows the token (`lxc remote add NAME TOKEN`) is trusted as that identity, held to its
    groups. A pending identity deleted takes its token with it."""
    monkeypatch.setattr(trust_password, "attempts", trust_password.PasswordAttempts())
    root = croft.replica
    put_instance(croft, "default", "c1")
    root.request("POST", "/1.0/auth/groups", {"name": "viewers", "permissions": [
        perm("project", "/1.0/projects/default", "viewer")]})  # fmt: skip
    made = root.request("POST", "/1.0/auth/identities/tls",
                        {"name": "laptop", "token": True, "groups": ["viewers"]})  # fmt: skip
    assert made.status == 201, made
    token = made.metadata
    assert (token["client_name"], token["type"]) == ("laptop", "Client certificate")
    identifier = made.headers["Location"].rsplit("/", 1)[1]
    listed = root.request("GET", "/1.0/auth/identities/tls?recursion=1").metadata
    assert [(i["id"], i["name"], i["type"], i["groups"]) for i in listed] == [
        (identifier, "laptop", "Client certificate (pending)", ["viewers"])]  # fmt: skip
    again = root.request("POST", "/1.0/auth/identities/tls", {"name": "laptop", "token": True})
    assert (again.status, again.error) == (409, 'An identity with name "laptop" already exists')

    laptop = croft.client("laptop")
    shown = base64.b64encode(json.dumps(token).encode()).decode()
    trusted = laptop.request("POST", "/1.0/certificates", {"password": shown})
    assert trusted.status == 201, trusted
    fingerprint = certificate_fingerprint(laptop.cert.read_text())
    ident = root.request("GET", f"/1.0/auth/identities/tls/{fingerprint}").metadata
    assert (ident["type"], ident["name"], ident["groups"]) == (
        "Client certificate", "laptop", ["viewers"])  # fmt: skip
    listed = root.request("GET", "/1.0/auth/identities/tls").metadata
    assert listed == [f"/1.0/auth/identities/tls/{fingerprint}"]  # the pending one is gone
    assert names(laptop.request("GET", "/1.0/instances")) == ["c1"]
    assert laptop.request("PUT", "/1.0", {"config": {}}).status == 403

    # Deleted while pending: its token trusts nobody.
    other = root.request("POST", "/1.0/auth/identities/tls", {"name": "phone", "token": True})
    assert other.status == 201, other
    pending_url = other.headers["Location"]
    assert root.request("DELETE", pending_url).status == 200
    phone = croft.client("phone")
    refused = phone.request("POST", "/1.0/certificates", {
        "password": base64.b64encode(json.dumps(other.metadata).encode()).decode()})  # fmt: skip
    assert refused.status == 403, refused
    assert phone.request("GET", "/1.0").metadata["auth"] == "untrusted"
    assert [c["name"] for c in root.request("GET", "/1.0/certificates?recursion=1").metadata] == [
        "laptop"]  # fmt: skip


def test_lxc_5_21_redeems_a_pending_identitys_token_through_the_auth_api(
    croft: Croft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lxc 5.21 and later redeem a pending identity's token (it carries a `type`) with
    `POST /1.0/auth/identities/tls {"trust_token": TOKEN}`, and a certificates token with
    `POST /1.0/certificates {"trust_token": TOKEN}` (LXD's explicit_trust_token): raw
    HTTPS from fresh client certificates, as only lxc 5.0.2 is installed here. Every
    refusal is LXD's status and words and leaves the pending identity, the trust store and
    the other tokens as they were."""
    monkeypatch.setattr(trust_password, "attempts", trust_password.PasswordAttempts())
    root = croft.replica
    assert {"access_management_tls", "explicit_trust_token"} <= set(
        root.request("GET", "/1.0").metadata["api_extensions"]
    )
    put_instance(croft, "default", "c1")
    root.request("POST", "/1.0/auth/groups", {"name": "viewers", "permissions": [
        perm("project", "/1.0/projects/default", "viewer")]})  # fmt: skip
    made = root.request("POST", "/1.0/auth/identities/tls",
                        {"name": "tablet", "token": True, "groups": ["viewers"]})  # fmt: skip
    assert made.status == 201, made
    pending_url = made.headers["Location"]
    token = base64.b64encode(json.dumps(made.metadata).encode()).decode()
    guess = base64.b64encode(json.dumps({**made.metadata, "secret": "0" * 64}).encode()).decode()
    other = croft.lxc("config", "trust", "add", "--name", "other", "-q").stdout.strip()

    def untouched() -> None:
        listed = root.request("GET", "/1.0/auth/identities/tls?recursion=1").metadata
        assert [(i["name"], i["type"]) for i in listed] == [
            ("tablet", "Client certificate (pending)")]  # fmt: skip
        assert root.request("GET", "/1.0/certificates").metadata == []
        tokens = json.loads(croft.lxc("config", "trust", "list-tokens", "--format", "json").stdout)
        assert sorted(t["ClientName"] for t in tokens) == ["other", "tablet"]

    tablet = croft.client("tablet")
    for client, body, status, error in (
        (tablet, {}, 403, "Trust token required"),
        (tablet, {"trust_token": token, "name": "x"}, 403, "Only trust token must be provided"),
        (tablet, {"trust_token": token, "groups": ["viewers"]}, 403,
         "Only trust token must be provided"),
        (tablet, {"trust_token": "not-a-token"}, 403, "not authorized"),
        (croft.client(), {"trust_token": token}, 400, "No client certificate provided"),
        (tablet, {"trust_token": guess}, 403, "No pending identities found with given secret"),
        # A certificates token is not a pending identity's (as LXD): refused, and kept.
        (tablet, {"trust_token": other}, 403, "No pending identities found with given secret"),
    ):  # fmt: skip
        refused = client.request("POST", "/1.0/auth/identities/tls", body)
        assert (refused.status, refused.error) == (status, error), (body, refused)
        assert refused.json["type"] == "error" and refused.json["error_code"] == status
        untouched()
    assert tablet.request("GET", "/1.0").metadata["auth"] == "untrusted"

    trusted = tablet.request("POST", "/1.0/auth/identities/tls", {"trust_token": token})
    fingerprint = certificate_fingerprint(tablet.cert.read_text())
    assert (trusted.status, trusted.headers["Location"]) == (
        201, f"/1.0/auth/identities/tls/{fingerprint}")  # fmt: skip
    assert tablet.request("GET", "/1.0").metadata["auth"] == "trusted"
    ident = root.request("GET", f"/1.0/auth/identities/tls/{fingerprint}").metadata
    assert (ident["type"], ident["name"], ident["groups"]) == (
        "Client certificate", "tablet", ["viewers"])  # fmt: skip
    assert root.request("GET", pending_url).status == 404  # the pending one became it
    assert names(tablet.request("GET", "/1.0/instances")) == ["c1"]
    assert tablet.request("PUT", "/1.0", {"config": {}}).status == 403  # held to its group

    # Used up: another certificate showing it is refused, the trusted one told it is.
    thief = croft.client("thief")
    refused = thief.request("POST", "/1.0/auth/identities/tls", {"trust_token": token})
    assert (refused.status, refused.error) == (403, "No pending identities found with given secret")
    assert thief.request("GET", "/1.0").metadata["auth"] == "untrusted"
    # Trusted now, and held to its group: LXD asks can_create_identities first.
    again = tablet.request("POST", "/1.0/auth/identities/tls", {"trust_token": token})
    assert (again.status, again.error) == (403, "Forbidden")
    assert [c["name"] for c in root.request("GET", "/1.0/certificates?recursion=1").metadata] == [
        "tablet"]  # fmt: skip

    # The certificates API takes its own token as `trust_token` (lxc 5.21 with
    # explicit_trust_token); once, and never as a password.
    desk = croft.client("desk")
    assert desk.request("POST", "/1.0/certificates", {"trust_token": "hunter2"}).status == 403
    added = desk.request("POST", "/1.0/certificates", {"type": "client", "trust_token": other})
    assert added.status == 201, added
    assert desk.request("GET", "/1.0").metadata["auth"] == "trusted"
    for path, error in (
        ("/1.0/certificates", "Client is already trusted"),
        ("/1.0/auth/identities/tls", "Client already trusted"),
    ):  # LXD's words
        again = desk.request("POST", path, {"trust_token": other})
        assert (again.status, again.error) == (409, error), path
    used = thief.request("POST", "/1.0/certificates", {"type": "client", "trust_token": other})
    assert (used.status, used.error) == (403, "No matching certificate add operation found")
    assert sorted(
        c["name"] for c in root.request("GET", "/1.0/certificates?recursion=1").metadata
    ) == ["other", "tablet"]
    assert json.loads(croft.lxc("config", "trust", "list-tokens", "--format", "json").stdout) == []
