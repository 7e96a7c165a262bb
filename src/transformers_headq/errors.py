"""Exceptions with messages that say what went wrong and what to do about it."""


class HeadQError(ValueError):
    """Base class: every error this library raises on bad input."""


class BasisFormatError(HeadQError):
    """A basis file or folder is missing, corrupt, of an unknown format, or not safetensors."""


class BasisMismatchError(HeadQError):
    """A basis was calibrated for a model with a different shape or positional encoding."""


class UnsupportedModelError(HeadQError):
    """The model's attention cannot take HeadQ's logit correction."""


class CacheInputError(HeadQError):
    """Keys or values handed to the cache do not fit it (shape, dtype or device)."""
