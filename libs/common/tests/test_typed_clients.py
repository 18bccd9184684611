"""Every RPC is called through its service's typed client (`croft.common.clients`):
each RPC has its method there, and no module elsewhere names an RPC by string, neither
in a `ServiceClient.call`/`.stream` nor through a helper that passes the name on."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import croft.v1
from croft.common import clients

REPO = Path(__file__).resolve().parents[3]
# The only modules that may name an RPC by string: the clients, and the transport.
ALLOWED = ("croft/common/clients/", "croft/common/rpc.py", "croft/v1/")

CLIENTS: dict[str, type] = {
    "Auth": clients.AuthClient,
    "Compute": clients.ComputeClient,
    "Images": clients.ImagesClient,
    "Network": clients.NetworkClient,
    "Node": clients.NodeClient,
    "Storage": clients.StorageClient,
}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def croft_rpcs() -> dict[str, list[str]]:
    """Every croft.v1 service and its RPCs, from the generated descriptors."""
    services: dict[str, list[str]] = {}
    for module in pkgutil.iter_modules(croft.v1.__path__):
        if module.name.endswith("_pb2"):
            pb2 = importlib.import_module(f"croft.v1.{module.name}")
            for name, service in pb2.DESCRIPTOR.services_by_name.items():
                services[name] = [m.name for m in service.methods]
    return services


def sources() -> list[Path]:
    roots = [*REPO.glob("libs/*/src"), *REPO.glob("services/*/src")]
    return sorted(
        path
        for root in roots
        for path in root.rglob("*.py")
        if not any(part in path.as_posix() for part in ALLOWED)
    )


def string_named_calls(tree: ast.AST, rpc_names: set[str]) -> list[tuple[int, str]]:
    """Where `tree` names an RPC by string: an RPC's name handed to any call (`x.call(
    "ChangeState", ...)`, `helper(ctx, "ChangeState", ...)`), or a `.call`/`.stream` whose
    method is a variable (a name passed through from elsewhere)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        arguments = [*node.args, *(k.value for k in node.keywords)]
        for arg in arguments:
            if isinstance(arg, ast.Constant) and arg.value in rpc_names:
                found.append((node.lineno, f"RPC {arg.value!r} named by string"))
        if (
            isinstance(node.func, ast.Attribute)
            and node.func.attr in ("call", "stream")
            and node.args
            and not isinstance(node.args[0], ast.Constant)
        ):
            found.append((node.lineno, f".{node.func.attr}() with a method passed as a value"))
    return found


@pytest.mark.parametrize("service", sorted(CLIENTS))
def test_every_rpc_of_a_service_has_a_method_of_its_typed_client(service: str) -> None:
    missing = [
        f"{CLIENTS[service].__name__}.{snake(rpc)}"
        for rpc in croft_rpcs()[service]
        if not callable(getattr(CLIENTS[service], snake(rpc), None))
    ]
    assert not missing, f"RPCs of {service} without their typed client method: {missing}"


def test_no_module_outside_the_clients_names_an_rpc_by_string() -> None:
    rpc_names = {rpc for rpcs in croft_rpcs().values() for rpc in rpcs}
    offences = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path in sources()
        for line, what in string_named_calls(ast.parse(path.read_text()), rpc_names)
    ]
    assert not offences, "call through croft.common.clients instead:\n" + "\n".join(offences)


def test_the_check_sees_an_rpc_named_by_string_directly_or_passed_through() -> None:
    rpc_names = {"ChangeState"}
    caught = [
        'await client.call("ChangeState", request)',
        'client.stream("ChangeState", request)',
        'await compute_operation(ctx, client, "ChangeState", message)',
        "await client.call(method, request)",
    ]
    for source in caught:
        assert string_named_calls(ast.parse(source), rpc_names), source
    passed = [
        "await client.change_state(request)",
        'http.stream("GET", url)',
        "await compute_operation(ctx, client.change_state, message)",
    ]
    for source in passed:
        assert not string_named_calls(ast.parse(source), rpc_names), source
