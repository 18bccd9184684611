"""Operations (LXD's `api.Operation`, wrapped in the api's bookkeeping).

    /croft/operations/<id>   OperationRecord

Operations are not under RECORDS: they are the api's working state, not LXD objects, and
their records expire.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from croft.common.models._base import Model, Record

OPERATIONS = "/croft/operations/"

OperationClass = Literal["task", "websocket", "token"]


class Operation(Model):
    """The operation as LXD clients see it."""

    id: str
    class_: OperationClass = Field(alias="class")
    description: str = ""
    created_at: str = ""
    updated_at: str = ""
    status: str = ""
    status_code: int = 0
    resources: dict[str, list[str]] | None = None
    metadata: dict[str, Any] | None = None
    may_cancel: bool = False
    err: str = ""
    location: str = ""


class OperationRecord(Record):
    """An operation and the api's bookkeeping of it: which replica runs it, whether a
    cancel was asked for, when its record goes (seconds since the epoch)."""

    operation: Operation
    project: str = "default"
    #: The api replica that runs the operation's task.
    owner: str = ""
    runs_task: bool = False
    cancel_requested: bool = False
    expires_at: float | None = None
    #: The store key of the record the task creates, when creating it is the work.
    done_if_created: str | None = None

    @staticmethod
    def store_key(op_id: str) -> str:
        return f"{OPERATIONS}{op_id}"

    def key(self) -> str:
        return self.store_key(self.operation.id)

    def public(self) -> dict[str, Any]:
        """The operation as `GET /1.0/operations/<id>` returns it."""
        return self.operation.dump()
