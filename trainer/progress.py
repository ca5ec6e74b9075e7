"""Progress bars for long work (tqdm on a terminal, quiet in tests and pipes unless forced)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable, desc: str = "", total: int | None = None, **kw):
    """tqdm when stderr is a terminal or KAIZEN_PROGRESS=1; KAIZEN_PROGRESS=0 silences it."""
    forced = os.environ.get("KAIZEN_PROGRESS")
    disable = (forced == "0") or (forced is None and not sys.stderr.isatty())
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False, **kw)
