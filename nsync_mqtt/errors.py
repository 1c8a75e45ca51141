"""One root error for NSync, with subclasses named for the state that caused them."""


class NSyncError(Exception):
    """Root of every error NSync raises on purpose."""


class ConfigError(NSyncError):
    """A setting is missing or has a bad value; the message names the key."""


class ProtocolError(NSyncError):
    """A message on the bus could not be decoded or failed validation."""


class CommandError(NSyncError):
    """A client command was refused; the message says why (sent back in the reply)."""


class NotMaster(CommandError):
    """This node is not the master and cannot take client commands."""


class QuorumLost(CommandError):
    """Fewer than f+1 nodes acknowledged in time."""


class SongMissing(CommandError):
    """A song hash names no song this node holds."""


class BrokerError(NSyncError):
    """The MQTT broker could not be reached or refused us."""
