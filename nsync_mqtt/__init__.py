"""NSync: fault-tolerant synchronised multi-room audio over MQTT."""

__version__ = "0.1.0"
