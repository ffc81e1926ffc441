"""Modbus TCP driver: config, codec, request planner and the polled driver."""
