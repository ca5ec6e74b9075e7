"""Logging setup of the services: plain text (default) or one JSON object per line.

    setup_logging("json")                    # station.toml / hub.toml: log_format = "json"
    log.info("installed %s", name, extra={"task": "pick", "version": 3})
    # {"ts": "2026-11-30T17:02:03.123Z", "level": "INFO", "logger": "kaizen.daemon",
    #  "msg": "installed pick-3.kpk", "fields": {"task": "pick", "version": 3}}

`fields` holds whatever the call passed in `extra=` (values that are not JSON become strings);
an exception adds "exc" (the formatted traceback). Messages and fields are cut to MAX_CHARS.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOG_FORMATS = ("plain", "json")
PLAIN_FORMAT = "%(asctime)s %(name)s %(message)s"
MAX_CHARS = 8192
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def check_log_format(source: str, field: str, value) -> None:
    """ConfigError naming the file and field unless `value` is "plain" or "json"."""
    if value not in LOG_FORMATS:
        from .errors import ConfigError

        raise ConfigError(f"{source}: field {field!r}: {value!r} must be one of {', '.join(LOG_FORMATS)}")


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value[:MAX_CHARS] if isinstance(value, str) else value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value[:100]]
    if isinstance(value, dict):
        return {str(k)[:200]: _jsonable(v) for k, v in list(value.items())[:100]}
    return str(value)[:MAX_CHARS]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, msg, fields[, exc]."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out = {"ts": ts, "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()[:MAX_CHARS],
               "fields": {k: _jsonable(v) for k, v in vars(record).items() if k not in _STANDARD}}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)[:MAX_CHARS]
        return json.dumps(out, ensure_ascii=False, allow_nan=True, default=str)


def setup_logging(log_format: str = "plain", level: int = logging.INFO, stream=None) -> logging.Handler:
    """Send the root logger's records to `stream` (stderr) in `log_format`; a handler an earlier
    call added is replaced, so calling it twice does not log twice. Returns the handler."""
    check_log_format("setup_logging", "log_format", log_format)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN_FORMAT))
    handler.kaizen_setup = True
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "kaizen_setup", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
