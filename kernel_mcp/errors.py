"""Errors of the kernel layer.

An exception raised by *user code* is not an error here: it is an `ExecutionResult`
with status ``"error"``. These are faults of the infrastructure::

    KernelError
    ├── KernelStartError          a kernel could not be started or did not become ready
    │   └── SandboxUnavailable    bubblewrap is missing or cannot start a sandbox here
    ├── CapacityError             the maximum number of kernels is reached (all are busy)
    ├── KernelClosed              the kernel was shut down (closed session, culled, evicted)
    ├── SessionNotFound (KeyError) no such session
    ├── InvalidSessionId (ValueError)
    └── FileAccessError           a path outside the session folder, too large, missing
        ├── FileTooLarge
        └── FileMissing           the path does not exist
"""

from __future__ import annotations


class KernelError(Exception):
    """Base class of the kernel layer's own faults."""


class KernelStartError(KernelError):
    """A kernel failed to start or to answer its first request in time."""


class SandboxUnavailable(KernelStartError):
    """Kernels must run sandboxed, and bubblewrap is missing or does not work here."""


class CapacityError(KernelError):
    """No more kernels may be started."""


class KernelClosed(KernelError):
    """The kernel was shut down; a session gets a fresh one on its next call."""


class SessionNotFound(KernelError, KeyError):
    """The session does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable.
        return str(self.args[0]) if self.args else "session not found"


class InvalidSessionId(KernelError, ValueError):
    """A session id that cannot name a session folder."""


class FileAccessError(KernelError):
    """A file operation the session may not perform."""


class FileTooLarge(FileAccessError):
    """A file exceeds the configured size bound."""


class FileMissing(FileAccessError):
    """The path does not exist in the session folder."""
