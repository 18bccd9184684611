"""croft.common.voters: which spare the store's leader asks to become a voter."""

from __future__ import annotations

from croft.common.cluster import Heartbeat, MemberRecord
from croft.common.voters import abandoned_joins, join_grace, plan

NOW = 1000.0


def member(
    name: str, id: int, voter: bool, domain: str = "default", **extra: object
) -> MemberRecord:
    url = f"https://{name}:2380" if voter else ""
    return MemberRecord(name=name, id=id, address=f"{name}:8443", etcd_peer_url=url,
                        etcd_client_url=url.replace("2380", "2379"), failure_domain=domain,
                        **extra)  # type: ignore[arg-type]  # fmt: skip


def beats(*online: str) -> dict[str, Heartbeat]:
    return {name: Heartbeat(at=NOW - 1) for name in online} | {"dead": Heartbeat(at=NOW - 60)}


def test_a_dead_voter_is_replaced_by_a_spare_of_its_failure_domain_first() -> None:
    members = [
        member("m1", 1, True), member("m2", 2, True), member("dead", 3, True, "az3"),
        member("m4", 4, False), member("m5", 5, False, "az3"),
    ]  # fmt: skip
    wanted = plan(members, beats("m1", "m2", "m4", "m5"), 20, 3, NOW)
    assert wanted is not None and (wanted.member, wanted.replaces) == ("m5", "dead")
    # Without one in its domain, the lowest id.
    wanted = plan(members[:4], beats("m1", "m2", "m4"), 20, 3, NOW)
    assert wanted is not None and (wanted.member, wanted.replaces) == ("m4", "dead")


def test_no_request_without_an_online_spare_or_a_need() -> None:
    three = [member("m1", 1, True), member("m2", 2, True), member("m3", 3, True)]
    assert plan(three, beats("m1", "m2", "m3"), 20, 3, NOW) is None
    assert plan([*three, member("m4", 4, False)], beats("m1", "m2", "m3", "m4"), 20, 3, NOW) is None
    # A dead voter, but the only spare is offline too (or still joining).
    dead = [*three[:2], member("dead", 3, True), member("m4", 4, False)]
    assert plan(dead, beats("m1", "m2"), 20, 3, NOW) is None
    pending = [*dead[:3], member("m4", 4, False, pending=True)]
    assert plan(pending, beats("m1", "m2", "m4"), 20, 3, NOW) is None


def test_a_missing_voter_is_filled_by_the_first_spare() -> None:
    members = [member("m1", 1, True), member("m3", 3, False), member("m2", 2, False)]
    wanted = plan(members, beats("m1", "m2", "m3"), 20, 3, NOW)
    assert wanted is not None and (wanted.member, wanted.replaces) == ("m2", "")


def test_a_join_without_a_heartbeat_past_its_grace_is_abandoned() -> None:
    late = member("m4", 4, True, pending=True, joined_at=NOW - join_grace(20) - 1)
    fresh = member("m5", 5, True, pending=True, joined_at=NOW - 1)
    assert abandoned_joins([late, fresh, member("m1", 1, True)], beats("m1"), 20, NOW) == [late]
