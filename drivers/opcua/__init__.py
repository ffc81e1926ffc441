"""OPC UA driver: config models and the subscription/poll driver (the only asyncua user in drivers)."""

from drivers.opcua.config import OpcUaNode, OpcUaSource

__all__ = ["OpcUaNode", "OpcUaSource"]
