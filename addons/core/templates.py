"""The files `acr` fills in (mirror.runmd, the systemd unit), shipped inside the package.

Read as package data, they are found wherever the package is: a checkout, a wheel in a venv, a
`pip install --user` or a system-wide install (no lookup under `sys.prefix`).
"""

from __future__ import annotations

from importlib import resources


def template(name: str) -> str:
    """The text of addons/templates/NAME; FileNotFoundError when the install lacks it."""
    return resources.files("addons").joinpath("templates", name).read_text(encoding="utf-8")
