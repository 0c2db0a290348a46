"""``--set module.NAME=value,...``: override int tile / launch constants of ``pallas_kernels`` modules for
one benchmark process (e.g. ``ltis_gpu.ATTN_NUM_WARPS=1,stis_gpu.NUM_WARPS=2``), to time candidate settings
in the same call as the defaults. Only existing upper-case int or bool constants can be set (a bool from 0 / 1,
e.g. ``stis_gpu.UNROLL=1``)."""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator


def parse(text: str | None) -> list[tuple[object, str, int]]:
    """"module.NAME=int,..." -> [(module, NAME, int or bool)]; raises ValueError on anything else."""
    settings = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        target, sep, value = item.partition("=")
        module_name, _, name = target.rpartition(".")
        if not sep or not module_name or not name.isupper():
            raise ValueError(f"expected module.NAME=int, got {item!r}")
        module = importlib.import_module(f"pallas_kernels.{module_name}")
        current = getattr(module, name, None)
        if not isinstance(current, int):
            raise ValueError(f"{target!r} is not an int or bool constant of pallas_kernels.{module_name}")
        number = int(value)
        if isinstance(current, bool):
            if number not in (0, 1):
                raise ValueError(f"{target!r} is a bool constant: set it to 0 or 1, got {value!r}")
            number = bool(number)
        settings.append((module, name, number))
    return settings


def _set(settings) -> dict[str, int]:
    """Sets parsed overrides; returns them as {"module.NAME": value}."""
    for module, name, value in settings:
        setattr(module, name, value)
    return {f"{module.__name__.rpartition('.')[2]}.{name}": value for module, name, value in settings}


def apply(text: str | None) -> dict[str, int]:
    """Applies ``text``'s overrides for the rest of the process; returns them as {"module.NAME": value}."""
    return _set(parse(text))


@contextlib.contextmanager
def applied(text: str | None) -> Iterator[dict[str, int]]:
    """Applies ``text``'s overrides inside the ``with`` block and restores the previous values after it, so
    that one process can time several settings in turn (each must be traced afresh: read at trace time)."""
    settings = parse(text)
    previous = [(module, name, getattr(module, name)) for module, name, _ in settings]
    try:
        yield _set(settings)
    finally:
        _set(previous)
