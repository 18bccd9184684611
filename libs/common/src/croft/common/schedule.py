"""LXD's snapshot schedules and expiries (`snapshots.schedule`, `snapshots.expiry`).

A schedule is a cron expression of five fields (minute hour day-of-month month
day-of-week: `*`, `*/n`, `a-b`, `a-b/n` and lists of those), one of the aliases LXD knows
(`@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@annually`, `@yearly`), or
several of these separated by commas. An expiry is LXD's duration: numbers with a unit
each, `M` minutes, `H` hours, `d` days, `w` weeks, `m` months, `y` years (`1w 2d`).
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@annually": "0 0 1 1 *",
    "@yearly": "0 0 1 1 *",
}
# (lowest, highest) of each field; day-of-week 7 is Sunday too, as in cron.
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def _field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"invalid step in {part!r}")
        if body == "*":
            start, end = low, high
        elif "-" in body:
            first, _, last = body.partition("-")
            start, end = int(first), int(last)
        else:
            start = int(body)
            end = high if step_text else start
        if not low <= start <= end <= high:
            raise ValueError(f"{part!r} is out of range {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """One or more cron expressions; `matches()` a minute."""

    entries: tuple[tuple[frozenset[int], ...], ...]

    @classmethod
    def parse(cls, text: str) -> CronSchedule:
        """ValueError, saying why, for what LXD would refuse."""
        entries = []
        for spec in (s.strip() for s in text.split(",") if s.strip()):
            if spec.startswith("@"):
                if spec not in ALIASES:
                    raise ValueError(f"unknown schedule alias {spec!r}")
                spec = ALIASES[spec]
            fields = spec.split()
            if len(fields) != 5:
                raise ValueError(f"{spec!r} is not a cron expression of five fields")
            try:
                entries.append(
                    tuple(
                        _field(f, low, high) for f, (low, high) in zip(fields, _RANGES, strict=True)
                    )
                )
            except ValueError as exc:
                raise ValueError(f"invalid cron expression {spec!r}: {exc}") from None
        if not entries:
            raise ValueError("empty schedule")
        return cls(tuple(entries))

    def matches(self, when: datetime) -> bool:
        weekday = (when.weekday() + 1) % 7  # cron's: 0 is Sunday
        for minute, hour, day, month, dow in self.entries:
            if (
                when.minute in minute
                and when.hour in hour
                and when.day in day
                and when.month in month
                and (weekday in dow or (weekday == 0 and 7 in dow))
            ):
                return True
        return False


_EXPIRY = re.compile(r"^(\d+)([MHdwmy])$")


def parse_expiry(text: str) -> tuple[int, int, timedelta]:
    """An expiry as (years, months, the rest); ValueError for a bad one."""
    years = months = 0
    rest = timedelta()
    for part in text.split():
        match = _EXPIRY.match(part)
        if not match:
            raise ValueError(f"invalid expiry {part!r} (e.g. 30M, 12H, 7d, 2w, 1m, 1y)")
        number, unit = int(match.group(1)), match.group(2)
        if unit == "y":
            years += number
        elif unit == "m":
            months += number
        else:
            rest += {
                "M": timedelta(minutes=number),
                "H": timedelta(hours=number),
                "d": timedelta(days=number),
                "w": timedelta(weeks=number),
            }[unit]
    return years, months, rest


def expires_at(created: datetime, expiry: str) -> datetime | None:
    """When a snapshot made at `created` expires under `expiry` (None: "" never)."""
    if not expiry.strip():
        return None
    years, months, rest = parse_expiry(expiry)
    month_index = created.month - 1 + months
    year = created.year + years + month_index // 12
    month = month_index % 12 + 1
    day = min(created.day, calendar.monthrange(year, month)[1])
    return created.replace(year=year, month=month, day=day) + rest


def expires_text(created: datetime, expiry: str) -> str:
    """`expires_at` as a record keeps it (RFC 3339, UTC; "": never); ValueError for an
    expiry LXD would refuse."""
    when = expires_at(created, expiry)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else ""


def expired(when: str | None, now: datetime) -> bool:
    """Whether a record's `expires_at` (None, "" or LXD's zero time: never) has passed
    at `now` (aware); a time that does not parse never expires."""
    if not when or when.startswith("0001-"):
        return False
    try:
        due = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return False
    return (due if due.tzinfo else due.replace(tzinfo=UTC)) <= now


#: How often `follow` looks at schedules and expiries (a schedule's unit is the minute).
TICK = 10.0


async def follow(
    take: Callable[[datetime], Awaitable[object]],
    expire: Callable[[datetime], Awaitable[object]],
    what: str,
) -> None:
    """Runs for the life of a service: `take(minute)` once in each minute (the
    snapshots its schedules name), `expire(now)` at each tick. A minute passed while
    the service was down is not made up for, as in LXD; a failed round (the store went
    away) is logged and tried again at the next tick."""
    last: datetime | None = None
    while True:
        now = datetime.now(UTC)
        minute = now.replace(second=0, microsecond=0)
        try:
            if minute != last:
                last = minute
                await take(minute)
            await expire(now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (again next tick)
            log.warning("%s snapshot schedules failed, again in %s s: %s", what, TICK, exc)
        await asyncio.sleep(TICK)


def snapshot_name(pattern: str, taken: Collection[str]) -> str:
    """A scheduled snapshot's name by `snapshots.pattern` (default `snap%d`), as LXD
    names it: `%d` is the lowest number that no snapshot in `taken` has."""
    pattern = pattern or "snap%d"
    if "%d" not in pattern:
        return pattern
    n = 0
    while pattern.replace("%d", str(n)) in taken:
        n += 1
    return pattern.replace("%d", str(n))


__all__ = [
    "ALIASES",
    "CronSchedule",
    "expired",
    "expires_at",
    "expires_text",
    "follow",
    "parse_expiry",
    "snapshot_name",
]
