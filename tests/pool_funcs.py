"""Module-level functions for the Pool tests (functions travel by import path)."""

from __future__ import annotations

import os
import time


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def pid() -> int:
    return os.getpid()


def boom(message: str) -> None:
    raise ValueError(message)


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def unserialisable() -> object:
    return object()
