"""Typed errors. Every message names what was wrong: the file, field or value."""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "InputError",
    "InvariantError",
    "MegaContextError",
    "ModelNotAvailableError",
    "StorageError",
    "UnsupportedModelError",
]


class MegaContextError(Exception):
    """Base class of every error raised by megacontext."""


class ConfigError(MegaContextError, ValueError):
    """A configuration value is invalid. ``field`` and ``value`` name it."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None):
        super().__init__(message)
        self.field = field
        self.value = value


class StorageError(MegaContextError, OSError):
    """An on-disk tree is unreadable or inconsistent. ``path`` and ``field`` name it."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        super().__init__(message)
        self.path = path
        self.field = field


class InvariantError(MegaContextError, AssertionError):
    """A working context or tree broke one of its invariants. ``entry`` names it."""

    def __init__(self, message: str, *, entry: int | None = None):
        super().__init__(message)
        self.entry = entry


class ModelNotAvailableError(MegaContextError, LookupError):
    """A base model cannot be loaded (not installed, not cached offline, not Llama-family)."""


class BackendUnavailableError(MegaContextError, RuntimeError):
    """A requested compute backend (cpp, cuda, triton) is not available in this build."""


class UnsupportedModelError(ModelNotAvailableError):
    """The model loads, but it is not a Llama-family decoder megacontext can drive."""


class InputError(MegaContextError, ValueError):
    """A call got unusable input (empty text, token ids outside the vocabulary, ...)."""
