"""Bounded JSON parsing for untrusted bytes: a nesting-depth check before `json.loads`.

`json.loads` recurses once per nesting level, so `[` x 100,000 raises RecursionError (or worse,
in a thread with a small stack). `loads` scans the bracket depth first, without recursion, and
refuses NaN/Infinity, so every problem is a ValueError whose message starts with `name`:

    data = loads("manifest.json", raw, max_depth=32)
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 32
# A string runs to its closing quote or to the end of the input, so the match never fails and
# never backtracks (an unterminated string full of escaped quotes stays linear).
_STRING = re.compile(rb'"(?:[^"\\]|\\.|\\\Z)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def depth(data: bytes) -> int:
    """The deepest bracket nesting of JSON text (strings skipped); no recursion, linear time."""
    brackets = _STRING.sub(b'""', data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def loads(name: str, data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON (no NaN/Infinity) nested at most `max_depth` deep; ValueError naming `name`."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if depth(raw) > max_depth:
        raise ValueError(f"{name}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RecursionError:  # pragma: no cover - the depth scan refuses this first
        raise ValueError(f"{name}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{name}: not valid JSON ({err})") from None
