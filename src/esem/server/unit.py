"""The systemd unit shipped with esem (``esem/data/esem.service``), as an operator
installs it: ``esem serve --print-systemd-unit`` prints it with ``ExecStart`` pointing at
this installation (``PYTHON -m esem``), since the shipped file can only guess where the
``esem`` script lives. Also the parser the tests use to start the service exactly as the
unit says.
"""

from __future__ import annotations

import shlex
import sys
from importlib import resources

UNIT_NAME = "esem.service"
SHIPPED_COMMAND = "/usr/local/bin/esem"  # what the shipped file's ExecStart runs


def shipped_unit() -> str:
    return resources.files("esem").joinpath("data", UNIT_NAME).read_text()


def systemd_unit(python: str = sys.executable) -> str:
    """The shipped unit with ExecStart running ``python -m esem``."""
    text = shipped_unit()
    old = f"ExecStart={SHIPPED_COMMAND} "
    if old not in text:
        raise RuntimeError(f"the shipped {UNIT_NAME} has no line starting {old!r}")
    return text.replace(old, f"ExecStart={shlex.quote(python)} -m esem ", 1)


def service_settings(unit: str) -> dict[str, list[str]]:
    """The ``[Service]`` section's settings, each key with its values in order (systemd
    allows repeating a key). Comments and other sections are skipped."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def exec_start(unit: str) -> list[str]:
    """The argv of the unit's (single) ``ExecStart``."""
    values = service_settings(unit).get("ExecStart", [])
    if len(values) != 1:
        raise ValueError(f"expected one ExecStart, found {len(values)}")
    return shlex.split(values[0])
