"""OPC UA driver: config models (config.py) and the subscription/poll driver (driver.py)."""
