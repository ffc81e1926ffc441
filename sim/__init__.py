"""The simulated campus: devices, 5G link emulation, fault injection, ground truth."""
