"""LXD's snapshot schedules (cron expressions and aliases) and expiries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from croft.common.schedule import CronSchedule, expires_at, parse_expiry

T = datetime(2026, 12, 7, 13, 0, tzinfo=UTC)  # a Monday


@pytest.mark.parametrize(
    ("schedule", "matching", "not_matching"),
    [
        ("* * * * *", [T, T + timedelta(minutes=7)], []),
        ("*/15 * * * *", [T, T + timedelta(minutes=45)], [T + timedelta(minutes=5)]),
        ("@hourly", [T, T + timedelta(hours=3)], [T + timedelta(minutes=1)]),
        ("@daily", [T.replace(hour=0)], [T]),
        ("0 13 * * 1", [T], [T + timedelta(days=1)]),
        ("0 13 * * 7", [T + timedelta(days=6)], [T]),  # 7 is Sunday too
        ("0 9-17/4 * * *", [T], [T.replace(hour=15)]),
        ("5 4 * * *, @hourly", [T, T.replace(hour=4, minute=5)], [T.replace(minute=5)]),
    ],
)
def test_a_schedule_matches_its_minutes(
    schedule: str, matching: list[datetime], not_matching: list[datetime]
) -> None:
    parsed = CronSchedule.parse(schedule)
    assert all(parsed.matches(when) for when in matching)
    assert not any(parsed.matches(when) for when in not_matching)


@pytest.mark.parametrize("bad", ["", "* * * *", "61 * * * *", "@sometimes", "*/0 * * * *", "x"])
def test_a_bad_schedule_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        CronSchedule.parse(bad)


def test_expiries_are_lxds_durations() -> None:
    assert expires_at(T, "") is None
    assert expires_at(T, "2M") == T + timedelta(minutes=2)
    assert expires_at(T, "1w 2d 3H") == T + timedelta(days=9, hours=3)
    assert expires_at(datetime(2026, 1, 31, tzinfo=UTC), "1m") == datetime(2026, 2, 28, tzinfo=UTC)
    assert expires_at(T, "1y") == T.replace(year=2027)
    for bad in ("2", "1x", "M", "1.5d"):
        with pytest.raises(ValueError):
            parse_expiry(bad)
