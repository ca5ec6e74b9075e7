"""Typed errors raised at the boundaries of Kaizen Edge.

Every message says what is wrong (file, field or message) and what to do about it.
"""


class KaizenError(Exception):
    """Base class of every error Kaizen Edge raises on bad input or bad state."""


class ConfigError(KaizenError):
    """A config file or config value is invalid (the message names the field)."""


class InputError(KaizenError):
    """A request's image or instruction is unusable (not an image, wrong shape, empty...)."""


class BundleError(KaizenError):
    """A base bundle folder is missing a file, has an altered file or a bad base.json."""


class PackError(KaizenError):
    """A task pack was refused (unsigned, tampered, wrong base, older version...)."""


class ProtocolError(KaizenError):
    """A wire message is malformed, oversized, of an unknown type or version."""


class ExtraMissingError(KaizenError):
    """A command needs an optional extra that is not installed."""
