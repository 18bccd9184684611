"""What the typed record models cost, per call, on the instance record a real croft
wrote (libs/common/tests/fixtures/records.json), beside what the code did before them.

    .venv/bin/python bench/records.py
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from croft.common.models import InstanceMeta, InstanceRecord
from croft.common.models.instance_wire import instance_from_wire, instance_to_wire
from croft.common.records import RECORDS, copy_record
from croft.v1 import compute_pb2

FIXTURE = Path(__file__).parent.parent / "libs/common/tests/fixtures/records.json"


def main() -> None:
    captured = json.loads(FIXTURE.read_text())
    record: dict[str, Any] = next(
        raw for key, raw in captured if key.startswith(f"{RECORDS}instances/")
    )
    validated = InstanceRecord.model_validate(record)
    meta = InstanceRecord.meta_of(record)
    stored = json.dumps(record)
    sent = instance_to_wire(validated).SerializeToString()
    cases: list[tuple[str, Callable[[], object]]] = [
        ("InstanceRecord.model_validate", lambda: InstanceRecord.model_validate(record)),
        ("InstanceRecord.meta_of", lambda: InstanceRecord.meta_of(record)),
        ("InstanceRecord.dump", validated.dump),
        ("InstanceMeta(...)", lambda: InstanceMeta(member="m", state="creating", pool="p")),
        ("InstanceMeta.dump", meta.dump),
        ("record.get('_croft', {}).get", lambda: record.get("_croft", {}).get("pool", "")),
        ("copy_record (for scale)", lambda: copy_record(record)),
        ("json.loads (for scale)", lambda: json.loads(stored)),
        # A record across a compute call, each way (what a JSON string in protobuf was).
        ("instance_to_wire + serialize", lambda: instance_to_wire(validated).SerializeToString()),
        (
            "parse + instance_from_wire",
            lambda: instance_from_wire(compute_pb2.Instance.FromString(sent)),
        ),
        ("json.dumps (for scale)", lambda: json.dumps(record)),
    ]
    number = 20_000
    for name, case in cases:
        best = min(timeit.repeat(case, number=number, repeat=5)) / number
        print(f"{name:32s} {best * 1e6:7.2f} us")


if __name__ == "__main__":
    main()
