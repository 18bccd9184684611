"""LXD's `?filter=` language (LXD 5.0, `api_filtering`): clauses `FIELD OP VALUE` joined by
`and` / `or`, each optionally preceded by `not`, evaluated left to right without
precedence, as LXD does. OP is `eq` or `ne`. FIELD is a dotted path into the object's
JSON (`name`, `status`, `config.image.os`: a map key may itself contain dots). A string
VALUE is an anchored regular expression unless it already holds `^` or `$`; it may be
quoted to contain spaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from croft.common.errors import InvalidArgument

_OPERATORS = ("eq", "ne")


@dataclass(frozen=True)
class Clause:
    field: str
    operator: str
    value: str
    negate: bool = False
    join: str = "and"  # how this clause combines with the result of the ones before it


def parse(text: str) -> list[Clause]:
    """Parse a filter; InvalidArgument says what is wrong with it."""
    parts = text.split()
    clauses: list[Clause] = []
    index = 0
    join = "and"

    def fail(why: str) -> InvalidArgument:
        return InvalidArgument(f"Invalid filter {text!r}: {why}")

    while index < len(parts):
        negate = False
        if parts[index].lower() == "not":
            negate = True
            index += 1
            if index == len(parts):
                raise fail("incomplete not clause")
        field = parts[index]
        index += 1
        if index == len(parts):
            raise fail("clause has no operator")
        operator = parts[index].lower()
        if operator not in _OPERATORS:
            raise fail(f"unsupported operator {parts[index]!r} (use eq or ne)")
        index += 1
        if index == len(parts):
            raise fail("clause has no value")
        value = parts[index]
        if value.startswith('"'):
            value = value[1:]
            while not value.endswith('"'):
                index += 1
                if index == len(parts):
                    raise fail("unterminated quote")
                value += " " + parts[index]
            value = value[:-1]
        index += 1
        clauses.append(Clause(field, operator, value, negate, join))
        if index < len(parts):
            join = parts[index].lower()
            if join not in ("and", "or"):
                raise fail(f"expected 'and' or 'or', got {parts[index]!r}")
            index += 1
            if index == len(parts):
                raise fail("unterminated compound clause")
    return clauses


_MISSING = object()


def value_of(obj: Any, path: str) -> Any:
    """The value at a dotted `path`; map keys may contain dots (`config.image.os`)."""
    if path == "":
        return obj
    if isinstance(obj, Mapping):
        if path in obj:
            return obj[path]
        # Longest key first, so `config.limits.cpu.allowance` prefers a key
        # `limits.cpu.allowance` over `limits`.
        pieces = path.split(".")
        for cut in range(len(pieces) - 1, 0, -1):
            head = ".".join(pieces[:cut])
            if head in obj:
                found = value_of(obj[head], ".".join(pieces[cut:]))
                if found is not _MISSING:
                    return found
        return _MISSING
    if isinstance(obj, list):
        head, _, rest = path.partition(".")
        if head.isdigit() and int(head) < len(obj):
            return value_of(obj[int(head)], rest)
    return _MISSING


def _equals(value: Any, wanted: str) -> bool:
    if value is _MISSING or value is None:
        return False
    if isinstance(value, bool):
        return wanted.lower() in (
            ("true", "1", "yes", "on") if value else ("false", "0", "no", "off")
        )
    if isinstance(value, int | float):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    if isinstance(value, str):
        pattern = wanted if ("^" in wanted or "$" in wanted) else f"^{wanted}$"
        try:
            return re.search(pattern, value) is not None
        except re.error:
            return value == wanted
    return str(value) == wanted


def matches(obj: Any, clauses: Iterable[Clause]) -> bool:
    result = True
    for clause in clauses:
        hit = _equals(value_of(obj, clause.field), clause.value)
        if clause.operator == "ne":
            hit = not hit
        if clause.negate:
            hit = not hit
        result = (result and hit) if clause.join == "and" else (result or hit)
    return result
