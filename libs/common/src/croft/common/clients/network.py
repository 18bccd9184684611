"""The typed client of the network service of one member: NICs, networks' state and leases."""

from __future__ import annotations

from croft.common.clients._base import TypedClient, record, unary
from croft.common.models import NetworkRecord
from croft.v1 import common_pb2, network_pb2, network_pb2_grpc


class NetworkClient(TypedClient, service="network", stub=network_pb2_grpc.NetworkStub):
    attach_instance = unary("AttachInstance", network_pb2.NicRequest, network_pb2.NicReply)
    detach_instance = unary("DetachInstance", network_pb2.NicRequest, common_pb2.Empty)
    network_state = unary("NetworkState", network_pb2.NetworkRef, common_pb2.Json)
    leases = unary("Leases", network_pb2.NetworkRef, common_pb2.Json)
    create_network = record("CreateNetwork", common_pb2.Json, NetworkRecord)
    update_network = record("UpdateNetwork", network_pb2.NetworkPut, NetworkRecord)
    delete_network = unary("DeleteNetwork", network_pb2.NetworkRef, common_pb2.Empty)
    rename_network = record("RenameNetwork", network_pb2.NetworkRename, NetworkRecord)
