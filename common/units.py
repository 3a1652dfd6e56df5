"""Quantities as people read them."""
from __future__ import annotations


def human_bytes(n: int) -> str:
    """1536 -> '1.50 KiB'; binary units, two decimals, plain bytes below 1 KiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
