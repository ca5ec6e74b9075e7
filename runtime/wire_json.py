"""Strict, bounded JSON for the wire (used by runtime/protocol.py; spec: runtime/PROTOCOL.md).

`strict_loads` refuses NaN/Infinity and numbers that overflow a double (1e400); `json_problem`
finds what json.loads accepts but a peer must not: nesting deeper than MAX_JSON_DEPTH, integers
beyond 64 bits, lone surrogates (not valid Unicode: SQLite and UTF-8 encoders raise on them).
`clean_detail` makes an error detail safe to send (no Python object reprs, bounded, valid UTF-8).

    obj = strict_loads(raw)            # ValueError / RecursionError if not strict JSON
    problem = json_problem(obj)        # None, or ("depth" | "int" | "unicode", why)
"""

from __future__ import annotations

import json
import math
import re

MAX_JSON_DEPTH = 32  # nesting of objects/lists in a header or body
MAX_INT = 2 ** 63 - 1  # every integer in a body fits a signed 64-bit int (JSON peers, SQLite)


def _strict_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range (strict JSON: finite numbers only)")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


def strict_loads(raw: bytes):
    """json.loads without NaN/Infinity/overflowing numbers (ValueError, or RecursionError)."""
    return json.loads(raw, parse_float=_strict_float, parse_constant=_no_constant)


def json_problem(obj) -> tuple[str, str] | None:
    """("depth" | "int" | "unicode", why) for the first value outside the wire's bounds, else None."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return "depth", f"nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(value, dict):
            items = list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            items = value
        else:
            items = (value,)
        for item in items:
            if isinstance(item, str):
                if not item.isascii():
                    try:
                        item.encode("utf-8")
                    except UnicodeEncodeError:
                        return "unicode", "a string holds a lone surrogate (not valid Unicode)"
            elif isinstance(item, int) and not isinstance(item, bool):
                if abs(item) > MAX_INT:
                    return "int", f"integer {str(item)[:20]}... is out of range (|n| < 2**63)"
            elif isinstance(item, (dict, list)) and item is not value:
                stack.append((item, depth + 1))
    return None


MAX_DETAIL_CHARS = 2000
_OBJECT_REPR = re.compile(r"<[^<>\n]{1,200}? at 0x[0-9a-fA-F]+>")


def clean_detail(detail) -> str:
    """An error detail for the wire: no Python object reprs (``<x object at 0x...>``), bounded."""
    text = str(detail)
    text = _OBJECT_REPR.sub("<object>", text[:2 * MAX_DETAIL_CHARS]) + ("..." if len(text) > 2 * MAX_DETAIL_CHARS else "")
    text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates on the wire
    return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "..."
