"""Exceptions with the bad value in the message; callers at the edge (CLI, HTTP) turn them into
clear messages or 4xx answers."""


class VitbirdsError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(VitbirdsError, ValueError):
    """A configuration value is invalid or inconsistent with another."""


class DataError(VitbirdsError):
    """A dataset could not be found, read or split."""


class ImageDecodeError(DataError):
    """One image could not be decoded; the message says why (empty, truncated, not an image...).

    `reason` is the kind of refusal as a stable code (Serve answers it as the JSON `reason`)."""

    reason = "undecodable_image"


class UnsupportedImageFormat(ImageDecodeError):
    """An image in a format outside the allow-list (e.g. RLE BMP, FITS): refused before decoding."""

    reason = "unsupported_format"


class ImageTooLarge(ImageDecodeError):
    """An image whose declared, decoded or resized size exceeds the pixel budget."""

    reason = "too_many_pixels"


class ExtremeAspectRatio(ImageDecodeError):
    """An image too long and thin to resize to the model's input without an unbounded long side."""

    reason = "extreme_aspect_ratio"


class DecodeBudgetExceeded(ImageDecodeError):
    """Decoding ran past its time or memory limit (the sandboxed decoder was stopped)."""

    reason = "decode_budget_exceeded"


class DecodersBusy(VitbirdsError):
    """Every sandboxed decoder stayed busy past the wait bound: the server's state, not the
    file's fault (Serve answers 503 with Retry-After, not a 4xx)."""


class ModelFileError(VitbirdsError):
    """A model directory is missing, incomplete or inconsistent with its metadata."""


class UnsafeModelFileError(ModelFileError):
    """A file would need unpickling to load: refused, since unpickling runs arbitrary code."""


class DeviceUnavailableError(VitbirdsError):
    """The requested torch device (cuda, mps) does not exist on this machine."""
