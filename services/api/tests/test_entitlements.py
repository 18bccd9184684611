"""LXD's entitlement model, asked directly with Identity objects (OIDC ones too, whose
login is built elsewhere): what a grant implies, and where it stops."""

from __future__ import annotations

import json

import pytest

from croft.api import access_rules
from croft.api.authz import AuthState, group_key, identity_key, idp_group_key, refusal
from croft.api.entitlements import SERVER, Grants, instance, parse_entity, project
from croft.api.identity import Identity
from croft.common.errors import InvalidArgument, NotFound, PermissionDenied


def perm(entity_type: str, url: str, entitlement: str) -> dict[str, str]:
    return {"entity_type": entity_type, "url": url, "entitlement": entitlement}


def state(*records: tuple[str, dict[str, object]]) -> AuthState:
    return AuthState.read([(key, json.dumps(value).encode()) for key, value in records])


OIDC = Identity("tls", True, method="oidc", subject="u-1", name="ann@example.org",
                groups=("devs",))  # fmt: skip
CERT = Identity("tls", True, fingerprint="ab" * 32)


@pytest.fixture
def auth() -> AuthState:
    return state(
        (group_key("ops"), {"name": "ops", "permissions": [
            perm("project", "/1.0/projects/pa", "operator")]}),
        (group_key("users"), {"name": "users", "permissions": [
            perm("instance", "/1.0/instances/c1?project=pb", "user")]}),
        (group_key("admins"), {"name": "admins", "permissions": [perm("server", "/1.0", "admin")]}),
        (idp_group_key("devs"), {"name": "devs", "groups": ["ops"]}),
        (identity_key("tls", "ab" * 32), {"id": "ab" * 32, "groups": ["users"]}),
    )  # fmt: skip


def test_an_oidc_user_gets_its_identity_provider_groups_grants(auth: AuthState) -> None:
    held = auth.grants_of(OIDC)
    assert held is not None
    assert held.allows("can_create_instances", project("pa"))
    assert held.allows("can_exec", instance("pa", "any"))
    assert held.allows("can_edit", instance("pa", "any"))  # operator edits instances
    assert held.allows("can_view_events", project("pa"))
    assert not held.allows("can_edit", project("pa"))  # but not the project itself
    assert not held.allows("can_view", instance("pb", "c1"))
    assert not held.allows("can_edit", SERVER)
    # Without the group claim, nothing.
    bare = auth.grants_of(Identity("tls", True, method="oidc", subject="u-2"))
    assert bare is not None and not bare.allows("can_view", project("pa"))


def test_an_instance_user_may_exec_but_not_edit(auth: AuthState) -> None:
    held = auth.grants_of(CERT)
    assert held is not None
    c1 = instance("pb", "c1")
    assert held.allows("can_view", c1) and held.allows("can_exec", c1)
    assert not held.allows("can_edit", c1) and not held.allows("can_update_state", c1)
    assert not held.allows("can_view", instance("pb", "c2"))
    assert not held.allows("can_view", project("pb"))
    with pytest.raises(PermissionDenied, match="Forbidden"):
        refusal(held, "can_edit", c1)
    with pytest.raises(NotFound, match="Not Found"):
        refusal(held, "can_edit", instance("pb", "c2"))


def test_who_is_held(auth: AuthState) -> None:
    assert auth.grants_of(Identity("unix", True)) is None  # root on the socket
    assert auth.grants_of(Identity("tls", True, fingerprint="cd" * 32)) is None  # no group
    assert auth.grants_of(Identity("tls", True, fingerprint="ab" * 32, restricted=True,
                                   projects=("pa",))) is None  # fmt: skip
    admin = state((group_key("admins"), {"name": "admins", "permissions": [
        perm("server", "/1.0", "admin")]}), (identity_key("oidc", "boss"), {"groups": ["admins"]}))  # fmt: skip
    held = admin.grants_of(Identity("tls", True, method="oidc", subject="boss"))
    assert held is not None
    assert held.allows("can_edit", instance("zz", "anything"))
    assert held.allows("can_delete", project("zz")) and held.allows("can_edit", SERVER)


def test_urls_and_entitlements_are_checked() -> None:
    assert parse_entity("instance", "/1.0/instances/c1").url == "/1.0/instances/c1?project=default"
    for entity_type, url in (("instance", "/1.0/profiles/p"), ("nothing", "/1.0"),
                             ("project", "/1.0/projects/a/b")):  # fmt: skip
        with pytest.raises(InvalidArgument):
            parse_entity(entity_type, url)


def test_every_endpoint_names_its_question() -> None:
    rule = access_rules.rule_for
    assert rule("PUT", "/1.0/instances/c1/state", "pa") == (
        "can_update_state",
        instance("pa", "c1"),
    )
    assert rule("PATCH", "/1.0/instances/c1", "pa") == ("can_edit", instance("pa", "c1"))
    assert rule("POST", "/1.0/instances/c1/exec", "pa") == ("can_exec", instance("pa", "c1"))
    assert rule("POST", "/1.0/instances", "pa") == ("can_create_instances", project("pa"))
    assert rule("PUT", "/1.0", "default") == ("can_edit", SERVER)
    assert rule("GET", "/1.0/instances", "pa") == access_rules.ALLOW
    # Collections created on the server: listed by all, created with a server entitlement.
    assert rule("POST", "/1.0/projects", "pa") == ("can_create_projects", SERVER)
    assert rule("GET", "/1.0/storage-pools", "pa") == access_rules.ALLOW
    assert rule("DELETE", "/1.0/auth/groups", "pa") is None
    assert rule("POST", "/1.0/nowhere", "pa") is None


def test_one_check_is_cheap_after_the_first(auth: AuthState) -> None:
    """Answers are remembered per identity: the second list asks nothing of the model."""
    held = auth.grants_of(OIDC)
    assert isinstance(held, Grants)
    held.allows("can_view", instance("pa", "c9"))
    assert any(entity == project("pa") for _, entity in held._answers)
