"""Imports the built-in drivers so that their ``@register`` decorators run."""

from drivers.modbus import driver as modbus_driver
from drivers.mqtt import driver as mqtt_driver
from drivers.opcua import driver as opcua_driver

__all__ = ["modbus_driver", "mqtt_driver", "opcua_driver"]
