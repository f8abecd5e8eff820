"""Exceptions raised by lqlib. All derive from :class:`LqlibError`."""

from __future__ import annotations

__all__ = [
    "LqlibError",
    "InputError",
    "FormatError",
    "ChecksumError",
    "CorruptStreamError",
    "CodecMismatchError",
    "ResourceNotFoundError",
]


class LqlibError(Exception):
    """Base class of every error lqlib raises on purpose."""


class InputError(LqlibError, ValueError):
    """The tensor given to a codec cannot be coded (NaN/Inf, bad shape or dtype, out of range)."""


class FormatError(LqlibError, ValueError):
    """Bytes that are not an lqlib bitstream: foreign, truncated or of an unknown version."""


class ChecksumError(FormatError):
    """The bitstream's checksum does not match its contents (corruption in storage or transit)."""


class CorruptStreamError(FormatError):
    """The entropy-coded payload is inconsistent with its header."""


class CodecMismatchError(LqlibError, ValueError):
    """A bitstream made with other codec settings was given to this codec."""


class ResourceNotFoundError(LqlibError, FileNotFoundError):
    """A model or corpus could not be found locally (nothing is downloaded at run time)."""
