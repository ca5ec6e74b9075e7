"""Service config of a station: `station.toml` (the hub's `hub.toml` lives in kaizen.hub.config).

Both are TOML files read with tomllib into validated dataclasses. Relative paths are resolved
against the TOML file's folder; every error is a ConfigError naming the file and the field:

    from kaizen.runtime.config import load_station_config
    cfg = load_station_config("deploy/station.toml")   # -> StationConfig

See deploy/station.toml and deploy/hub.toml for commented examples of every field.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

STATION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
ENDPOINT_RE = re.compile(r"^(tcp|ipc|inproc)://\S+$")


def _fail(source: str, name: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: field {name!r}: {message}")


def _check_endpoint(source: str, name: str, value: str) -> None:
    if not isinstance(value, str) or not ENDPOINT_RE.match(value):
        raise _fail(source, name, f"{value!r} is not a ZeroMQ endpoint (tcp://host:port, ipc://path)")


def _check_station_id(source: str, name: str, value: str) -> None:
    if not isinstance(value, str) or not STATION_ID_RE.match(value):
        raise _fail(source, name, f"{value!r} is not a station id (letters, digits, _ . : / -, max 128)")


def _check_positive(source: str, name: str, value: Any, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise _fail(source, name, f"{value!r} must be {kind}")


def _check_level(source: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise _fail(source, name, f"{value!r} must be a number in [0, 1]")


@dataclass
class CaptureConfig:
    """station.toml `[capture]`: parts the station keeps for the hub (the improvement loop).

    No-match parts are always captured, answered parts below their task's confidence level too;
    the queue (state_dir/capture) holds at most max_items samples and max_mb MiB, oldest dropped."""

    enabled: bool = True
    max_items: int = 10_000
    max_mb: float = 512.0
    confidence: float = 0.5               # answered parts below this confidence are captured
    task_confidence: dict = field(default_factory=dict)   # [capture.task_confidence] task = level
    source: str = "<station config>"

    def __post_init__(self) -> None:
        src = self.source
        if not isinstance(self.enabled, bool):
            raise _fail(src, "capture.enabled", f"{self.enabled!r} must be true or false")
        _check_positive(src, "capture.max_items", self.max_items, integer=True)
        _check_positive(src, "capture.max_mb", self.max_mb)
        _check_level(src, "capture.confidence", self.confidence)
        if not isinstance(self.task_confidence, dict):
            raise _fail(src, "capture.task_confidence", f"{self.task_confidence!r} must be a table "
                        "of task = level, e.g. [capture.task_confidence] seal = 0.8")
        for task, level in self.task_confidence.items():
            _check_level(src, f"capture.task_confidence.{task}", level)

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * (1 << 20))


@dataclass
class StationConfig:
    """One station: its identity and keys, the hub it talks to, and its local folders."""

    station_id: str
    hub_endpoint: str
    hub_public_key_file: Path
    public_key_file: Path
    secret_key_file: Path
    bundle_dir: Path
    store_dir: Path
    trusted_keys_dir: Path
    state_dir: Path                       # staging files, offsets, report outbox
    inference_endpoint: str = ""          # "" = ipc://<runtime_dir>/station.ipc
    admin_endpoint: str = ""              # "" = ipc://<runtime_dir>/admin/admin.ipc (ipc only)
    runtime_dir: Path | None = None       # private folder of the sockets; None = state_dir/run
    hub_announce_endpoint: str = ""       # the hub's PUB socket (hints only); "" = none
    threshold: float = 0.2                # selection: below this score -> "no task matches"
    calibrated_threshold: bool = True     # also below the best pack's own calibrated selection_threshold
    top_k: int = 0                        # packs fused per answer; 0 = each pack's own fusion_top_k
    heartbeat_s: float = 5.0
    hub_timeout_s: float = 15.0           # silence after which the DEALER is reopened
    credit: int = 4                       # chunks in flight per transfer
    providers: list = field(default_factory=list)  # ONNX Runtime EPs in order; [] = CUDA if present, else CPU
    threads: int = 0                      # ORT intra-op threads; 0 = ORT's choice
    max_image_pixels: int = 25_000_000    # larger images are refused before decoding (bad_input)
    max_instruction_tokens: int = 512     # longer instructions are refused (bad_input)
    metrics_listen: str = ""              # Prometheus /metrics "127.0.0.1:9464"; "" = off
    metrics_allow_remote: bool = False    # allow a non-loopback metrics_listen (no authentication)
    log_format: str = "plain"             # or "json": one JSON object per line
    capture: CaptureConfig = field(default_factory=CaptureConfig)   # the [capture] table
    source: str = "<station config>"      # the file it came from (for error messages)

    def __post_init__(self) -> None:
        src = self.source
        if isinstance(self.capture, dict):
            self.capture = _build(CaptureConfig, self.capture, src, "capture", (), Path("."))
        elif not isinstance(self.capture, CaptureConfig):
            raise _fail(src, "capture", f"{self.capture!r} must be a table ([capture])")
        _check_station_id(src, "station_id", self.station_id)
        _check_endpoint(src, "hub_endpoint", self.hub_endpoint)
        self.runtime_dir = Path(self.runtime_dir or Path(self.state_dir) / "run")
        self.inference_endpoint = self.inference_endpoint or f"ipc://{self.runtime_dir}/station.ipc"
        self.admin_endpoint = self.admin_endpoint or f"ipc://{self.runtime_dir}/admin/admin.ipc"
        _check_endpoint(src, "inference_endpoint", self.inference_endpoint)
        if self.inference_endpoint.startswith("ipc://@"):
            raise _fail(src, "inference_endpoint", "abstract sockets (ipc://@name) have no file "
                        "permissions: use ipc:///PATH in a private folder")
        from .admin import check_admin_endpoint  # admin tcp/abstract refused, path length
        try:
            check_admin_endpoint(self.admin_endpoint)
        except ConfigError as err:
            raise _fail(src, "admin_endpoint", str(err)) from None
        if self.hub_announce_endpoint:
            _check_endpoint(src, "hub_announce_endpoint", self.hub_announce_endpoint)
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or not -1.0 <= self.threshold <= 1.0:
            raise _fail(src, "threshold", f"{self.threshold!r} must be a number in [-1, 1]")
        if not isinstance(self.calibrated_threshold, bool):
            raise _fail(src, "calibrated_threshold", f"{self.calibrated_threshold!r} must be true or false")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= 64:
            raise _fail(src, "top_k", f"{self.top_k!r} must be 0 (fuse as each pack was trained) or 1..64 packs")
        _check_positive(src, "max_image_pixels", self.max_image_pixels, integer=True)
        _check_positive(src, "max_instruction_tokens", self.max_instruction_tokens, integer=True)
        _check_positive(src, "heartbeat_s", self.heartbeat_s)
        _check_positive(src, "hub_timeout_s", self.hub_timeout_s)
        if self.hub_timeout_s <= self.heartbeat_s:
            raise _fail(src, "hub_timeout_s", f"{self.hub_timeout_s} must exceed heartbeat_s "
                        f"({self.heartbeat_s}), e.g. 3 x heartbeat_s")
        _check_positive(src, "credit", self.credit, integer=True)
        if not isinstance(self.providers, list) or not all(
                isinstance(p, str) and p.endswith("ExecutionProvider") for p in self.providers):
            raise _fail(src, "providers", f"{self.providers!r} must be a list such as "
                        '["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]')
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise _fail(src, "threads", f"{self.threads!r} must be an integer >= 0 (0 = ONNX Runtime's choice)")
        if self.credit > 64:
            raise _fail(src, "credit", f"{self.credit} is too large (at most 64 chunks in flight)")
        from .metrics_http import check_listen_fields  # metrics_listen loopback unless allowed, log_format
        check_listen_fields(src, self, "metrics")


# ---------------------------------------------------------------- loading


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def _build(cls, data: dict, source: str, section: str, paths: tuple[str, ...], base: Path,
           extra: dict | None = None):
    """Instantiate dataclass `cls` from `data`, naming unknown/missing/mistyped fields."""
    names = {f.name for f in dataclasses.fields(cls)} - {"source"} - set(extra or {})
    prefix = f"{section}." if section else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field {prefix}{unknown[0]!r} (known: {', '.join(sorted(names))})")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data) - set(extra or {}))
    if missing:
        raise ConfigError(f"{source}: missing field {prefix}{missing[0]!r}")
    kwargs = dict(data)
    for name in paths:
        if name in kwargs:
            if not isinstance(kwargs[name], str) or not kwargs[name]:
                raise ConfigError(f"{source}: field {prefix}{name!r}: {kwargs[name]!r} is not a path")
            kwargs[name] = (base / kwargs[name]).resolve()
    kwargs.update(extra or {})
    if "source" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["source"] = source
    return cls(**kwargs)


STATION_PATHS = ("hub_public_key_file", "public_key_file", "secret_key_file", "bundle_dir",
                 "store_dir", "trusted_keys_dir", "state_dir", "runtime_dir")


def load_station_config(path: str | Path) -> StationConfig:
    """Read a station.toml (all fields at top level, or under a [station] table; [capture] either way)."""
    path = Path(path)
    data = _read_toml(path)
    if isinstance(data.get("station"), dict) and set(data) <= {"station", "capture"}:
        data = {**data["station"], **({"capture": data["capture"]} if "capture" in data else {})}
    return _build(StationConfig, data, str(path), "", STATION_PATHS, path.resolve().parent)
