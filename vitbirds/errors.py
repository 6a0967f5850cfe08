"""Exceptions with the bad value in the message; callers at the edge (CLI, HTTP) turn them into
clear messages or 4xx answers."""


class VitbirdsError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(VitbirdsError, ValueError):
    """A configuration value is invalid or inconsistent with another."""


class DataError(VitbirdsError):
    """A dataset could not be found, read or split."""


class ImageDecodeError(DataError):
    """One image could not be decoded; the reason says why (empty, truncated, not an image...)."""


class ModelFileError(VitbirdsError):
    """A model directory is missing, incomplete or inconsistent with its metadata."""


class UnsafeModelFileError(ModelFileError):
    """A file would need unpickling to load: refused, since unpickling runs arbitrary code."""


class DeviceUnavailableError(VitbirdsError):
    """The requested torch device (cuda, mps) does not exist on this machine."""
