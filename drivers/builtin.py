"""Imports the built-in drivers so that their ``@register`` decorators run."""

import drivers.modbus.driver as modbus_driver
import drivers.mqtt.driver as mqtt_driver
import drivers.opcua.driver as opcua_driver

__all__ = ["modbus_driver", "mqtt_driver", "opcua_driver"]
