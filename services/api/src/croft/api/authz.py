"""Fine-grained authorization: who is in which group, what each group was granted, and
the one question every endpoint asks, `may(connection, entitlement, entity)`.

Records (the api owns them, as it owns projects), under `/croft/records/auth/`:
`groups/<name>` (LXD's AuthGroup without its computed members), `identities/<method>/<id>`
(an identity's groups: a TLS certificate's or an OIDC user's), and
`identity-provider-groups/<name>` (the croft groups an identity provider's group maps to).

An `Authorizer` per replica keeps them in memory, rebuilt on the next request after any
change: this replica's own writes drop the copy at once (`changed`), a watch on the prefix
drops it for writes made through another replica.

Who is held to grants: every OIDC user, a TLS identity created through
`POST /1.0/auth/identities/tls` (fine-grained: held even while in no group), and a
trusted, unrestricted certificate of the trust store that is a member of at least one
group. The unix socket's root and unrestricted certificates
in no group keep full access; restricted certificates keep their projects
(`croft.api.auth`). Those pass every check here (`grants_of` is None for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.requests import HTTPConnection

from croft.api.entitlements import MODEL, Entity, Grants, entity_of_url, parse_entity
from croft.api.identity import Identity
from croft.common.errors import CroftError, NotFound, PermissionDenied
from croft.common.records import RECORDS
from croft.common.store import Store
from croft.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

AUTH_PREFIX = f"{RECORDS}auth/"
GROUPS = f"{AUTH_PREFIX}groups/"
IDENTITIES = f"{AUTH_PREFIX}identities/"
IDP_GROUPS = f"{AUTH_PREFIX}identity-provider-groups/"

# The scope key under which the middleware leaves a held identity's grants.
GRANTS_KEY = "croft.grants"


def group_key(name: str) -> str:
    return f"{GROUPS}{name}"


def identity_key(method: str, identifier: str) -> str:
    return f"{IDENTITIES}{method}/{identifier}"


def idp_group_key(name: str) -> str:
    return f"{IDP_GROUPS}{name}"


def group_url(name: str) -> str:
    return f"/1.0/auth/groups/{quote(name, safe='')}"


def identity_url(method: str, identifier: str) -> str:
    return f"/1.0/auth/identities/{method}/{quote(identifier, safe='')}"


def idp_group_url(name: str) -> str:
    return f"/1.0/auth/identity-provider-groups/{quote(name, safe='')}"


@dataclass
class AuthState:
    """Every auth record, as read at one moment."""

    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    identities: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    idp_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    _grants: dict[tuple[str, str, tuple[str, ...]], Grants] = field(default_factory=dict)
    _permissions: dict[str, frozenset[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def read(cls, values: list[tuple[str, bytes]]) -> AuthState:
        state = cls()
        for key, value in values:
            try:
                record = json.loads(value)
            except ValueError:
                continue
            if key.startswith(GROUPS):
                state.groups[record["name"]] = record
            elif key.startswith(IDENTITIES):
                method, _, identifier = key.removeprefix(IDENTITIES).partition("/")
                state.identities[(method, identifier)] = record
            elif key.startswith(IDP_GROUPS):
                state.idp_groups[record["name"]] = record
        for name, group in state.groups.items():
            grants = set()
            for permission in group.get("permissions") or []:
                try:
                    entity = parse_entity(permission["entity_type"], permission["url"])
                except (CroftError, KeyError):
                    continue
                grants.add((permission["entitlement"], entity.url))
            state._permissions[name] = frozenset(grants)
        return state

    def groups_of(self, who: Identity) -> list[str]:
        """The croft groups `who` is in: its own, and those its identity provider's groups
        map to (OIDC)."""
        record = self.identities.get((who.auth_method, who.id)) or {}
        names = list(record.get("groups") or [])
        for idp in who.groups:
            for name in (self.idp_groups.get(idp) or {}).get("groups") or []:
                if name not in names:
                    names.append(name)
        return [n for n in names if n in self.groups]

    def held(self, who: Identity) -> bool:
        """Whether grants decide what `who` may do (see the module's docstring)."""
        if not who.trusted:
            return False
        if who.auth_method == "oidc":
            return True
        if who.auth_method != "tls" or who.restricted:
            return False
        record = self.identities.get(("tls", who.id)) or {}
        return bool(record.get("fine_grained") or record.get("groups"))

    def grants_of(self, who: Identity) -> Grants | None:
        """`who`'s grants; None when grants do not hold `who` (full access, or a
        restricted certificate's own rules)."""
        if not self.held(who):
            return None
        key = (who.auth_method, who.id, who.groups)
        found = self._grants.get(key)
        if found is None:
            union: set[tuple[str, str]] = set()
            for name in self.groups_of(who):
                union |= self._permissions.get(name, frozenset())
            found = self._grants[key] = Grants(frozenset(union))
        return found


class Authorizer:
    """The auth records of one replica, in memory (see the module's docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._state: AuthState | None = None
        self._loading: asyncio.Future[AuthState] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._follow(), name="authz-watch")

    async def close(self) -> None:
        if self._watcher is not None:
            await cancel_and_wait(self._watcher)

    async def _follow(self) -> None:
        while True:
            try:
                async for _ in self.store.watch(AUTH_PREFIX):
                    self.changed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the watch broke: forget, and follow again
                log.debug("auth records watch ended: %s", exc)
                self.changed()
                await asyncio.sleep(0.5)

    def changed(self) -> None:
        """Forget the records: the next request reads them again."""
        self._state = None

    async def state(self) -> AuthState:
        state = self._state
        if state is not None:
            return state
        entries = await self.store.list(AUTH_PREFIX)
        state = AuthState.read([(e.key, e.value) for e in entries])
        self._state = state
        return state


# ---------------------------------------------------------------------------- the question


def grants(connection: HTTPConnection) -> Grants | None:
    """The grants the middleware found for this request's caller; None: not held."""
    found = connection.scope.get(GRANTS_KEY)
    return found if isinstance(found, Grants) else None


def may(connection: HTTPConnection, entitlement: str, entity: Entity) -> bool:
    """May the caller of this request do `entitlement` on `entity`? Always yes for a
    caller grants do not hold."""
    held = grants(connection)
    return held is None or held.allows(entitlement, entity)


_ENTITIES: dict[str, Entity | None] = {}


def viewable(held: Grants, url: str, project: str = "default") -> bool:
    """Whether `held` may see what the LXD URL `url` names (an item of a list, a `used_by`
    entry; one without `?project=` is in `project`). URLs of no entity type here, and
    types without `can_view` (storage pools), are seen by all."""
    if project != "default" and "project=" not in url:
        url = f"{url}{'&' if '?' in url else '?'}project={quote(project, safe='')}"
    try:
        entity = _ENTITIES[url]
    except KeyError:
        try:
            entity = entity_of_url(url)
        except CroftError:
            return False
        if len(_ENTITIES) > 50_000:
            _ENTITIES.clear()
        _ENTITIES[url] = entity
    if entity is None or "can_view" not in MODEL[entity.type]:
        return True
    return held.allows("can_view", entity)


def require(connection: HTTPConnection, entitlement: str, entity: Entity) -> None:
    """`may`, or LXD's answer: 404 when the caller may not even see the entity, else 403."""
    held = grants(connection)
    if held is not None:
        refusal(held, entitlement, entity)


def refusal(held: Grants, entitlement: str, entity: Entity) -> None:
    """Nothing when `held` allows it; else LXD's generic errors, which name nothing: 404
    when the caller may not see the entity at all, 403 when it may see but not do this."""
    if held.allows(entitlement, entity):
        return
    if entitlement != "can_view" and "can_view" in MODEL[entity.type]:
        if held.allows("can_view", entity):
            raise PermissionDenied("Forbidden")
        raise NotFound("Not Found")
    if entitlement == "can_view":
        raise NotFound("Not Found")
    raise PermissionDenied("Forbidden")


def authorizer(connection: HTTPConnection) -> Authorizer:
    found: Authorizer = connection.app.state.croft.authorizer
    return found


def forget_on_change(connection: HTTPConnection) -> None:
    """This replica changed an auth record: the next request reads them again."""
    with contextlib.suppress(AttributeError):
        authorizer(connection).changed()
