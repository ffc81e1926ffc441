"""MQTT field devices (smart benches, EV chargers): config, payload schemas and the driver."""
