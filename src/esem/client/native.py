"""Which client carries the Python API's sessions, and the native one's error mapping.

The hot path of ``sem_open(..., flags=USE_ESEM)`` and ``esem.posix_ipc`` can ride on the
native client (``esem._native_core``, the Rust ``esem-client`` through PyO3; built by
``pip install`` when cargo is present). ``ESEM_CLIENT`` chooses: ``python`` the pure-Python
client (the reference implementation the attack tools and interop tests use), ``native``
the native one (an error if it is not built), unset the default below. A
``esem.Client`` object is the same either way (its fork guard, failure, statistics and
methods); only its transport differs. Switchless sessions ride on the native client's
rings too (``connect(..., switchless=...)``): a post from Python is then one call that
writes the request ring and spins on the reply ring with the GIL released, no
interpreter pass in between. Clients made with non-default timeouts stay on the Python
client.

Errors: the native module raises what the Python client raises for the same event,
made here by ``_exception`` (registered once as the module's error factory).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from esem.core.status import Status
from esem.errors import (
    EsemError,
    IntegrityError,
    ProtocolError,
    ServiceUnavailable,
    SignalError,
    error_for,
)

# How a native session asks for the rings (``esem._native_core.Session``'s switchless).
SOCKET: Final = 0
PREFER: Final = 1  # a refusal is a logged warning, and the session stays on the socket
REQUIRE: Final = 2  # a refusal raises SwitchlessUnavailable

if TYPE_CHECKING:
    from esem._native_core import Session

ENV: Final = "ESEM_CLIENT"
CHOICES: Final = ("python", "native")
# The default when ESEM_CLIENT is unset: the native client once it passes the whole
# client-facing suite (tests/e2e, tests/sync, tests/native run under both clients).
DEFAULT: Final = "native"

try:
    from esem import _native_core as _module
except ImportError:  # built without Rust (setuptools-rust's optional extension)
    _module = None  # type: ignore[assignment]


def _exception(kind: int, status: int, message: str) -> BaseException:
    """The exception the Python client raises for what the native client reports."""
    assert _module is not None
    if kind == _module.K_STATUS:
        try:
            st = Status(status)
        except ValueError:
            return ProtocolError(f"unknown status {status} from the service: {message}")
        return error_for(st, message)
    if kind == _module.K_PROTOCOL:
        return ProtocolError(message)
    if kind == _module.K_INTEGRITY:
        return IntegrityError(message)
    if kind == _module.K_UNAVAILABLE:
        return ServiceUnavailable(message)
    if kind == _module.K_INTERRUPTED:
        return SignalError(message)
    if kind == _module.K_SWITCHLESS:
        from esem.client.switchless import SwitchlessUnavailable

        return SwitchlessUnavailable(message)
    return ValueError(message)


if _module is not None:
    _module.set_error_factory(_exception)


def available() -> bool:
    """Whether the native client was built into this installation."""
    return _module is not None


def chosen() -> str:
    """``"native"`` or ``"python"``, from ``ESEM_CLIENT`` (read at each new session).
    ``ESEM_CLIENT=native`` without the native client built raises ``ServiceUnavailable``;
    another value is a ``ValueError``."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return DEFAULT if available() else "python"
    if raw not in CHOICES:
        raise ValueError(f"{ENV}={raw!r}: expected one of {', '.join(CHOICES)}")
    if raw == "native" and not available():
        raise ServiceUnavailable(
            f"{ENV}=native, but esem's native client (esem._native_core) is not built: "
            "install esem with a Rust toolchain (cargo) on the PATH")
    return raw


def connect(sock: str, pubkey: bytes, switchless: int = SOCKET) -> Session:
    """A native session with the service at ``sock`` (only once ``chosen()`` said native),
    on the switchless rings if ``switchless`` (``PREFER``, ``REQUIRE``) asks for them."""
    if _module is None:
        raise EsemError("esem._native_core is not built")
    return _module.Session(sock, pubkey, switchless)
