"""The hub's service config: `hub.toml` read into a validated `HubConfig`.

    from kaizen.hub.config import load_hub_config
    hub = load_hub_config("deploy/hub.toml")           # -> HubConfig

Relative paths resolve against the TOML file's folder; every error is a ConfigError naming the
file and the field (two stations with the same public key are refused here too). See
deploy/hub.toml for a commented example of every field.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from kaizen.runtime.config import (
    _build,
    _check_endpoint,
    _check_positive,
    _check_station_id,
    _fail,
    _read_toml,
)
from kaizen.runtime.errors import ConfigError, KaizenError
from kaizen.runtime.keys import load_curve_public
from kaizen.runtime.metrics_http import check_listen_fields

HUB_PATHS = ("public_key_file", "secret_key_file", "packs_dir", "db_path", "trusted_keys_dir", "samples_dir")


@dataclass
class AllowedStation:
    """One allow-listed station of the hub: its id, CURVE public key file and groups."""

    id: str
    public_key_file: Path
    groups: list[str] = field(default_factory=list)


@dataclass
class HubConfig:
    """The trainer hub: its endpoints, CURVE server keys, allow-list, pack folder and database."""

    bind: str
    pub_bind: str
    public_key_file: Path
    secret_key_file: Path
    packs_dir: Path
    db_path: Path
    stations: list[AllowedStation] = field(default_factory=list)
    trusted_keys_dir: Path | None = None  # Ed25519 keys packs must be signed by; None = unchecked
    chunk_size: int = 256 * 1024
    max_credit: int = 16                  # a fetch asking for more chunks gets this many
    max_message_bytes: int = 1024 * 1024  # largest station message (sum of frames) the hub reads
    metrics_listen: str = ""              # Prometheus /metrics, e.g. "127.0.0.1:9465"; "" = off
    metrics_allow_remote: bool = False    # allow a non-loopback metrics_listen (no authentication)
    status_listen: str = ""               # read-only status page, e.g. "127.0.0.1:8470"; "" = off
    status_allow_remote: bool = False     # allow a non-loopback status_listen (no authentication)
    log_format: str = "plain"             # or "json": one JSON object per line
    samples_dir: Path | None = None       # captured parts (hub/samples.py); None = <db_path's folder>/samples
    samples_max_sample_bytes: int = 16 * 1024 * 1024   # a bigger image is refused
    samples_max_total_bytes: int = 20 * 1024 ** 3      # full: stations keep their samples and retry later
    samples_max_partial_per_station: int = 16          # multi-chunk uploads in progress per station
    source: str = "<hub config>"

    def __post_init__(self) -> None:
        src = self.source
        _check_endpoint(src, "bind", self.bind)
        _check_endpoint(src, "pub_bind", self.pub_bind)
        if self.bind == self.pub_bind:
            raise _fail(src, "pub_bind", "must differ from bind")
        _check_positive(src, "chunk_size", self.chunk_size, integer=True)
        if not 1024 <= self.chunk_size <= 16 * 1024 * 1024:
            raise _fail(src, "chunk_size", f"{self.chunk_size} must be within 1 KiB .. 16 MiB")
        _check_positive(src, "max_credit", self.max_credit, integer=True)
        _check_positive(src, "max_message_bytes", self.max_message_bytes, integer=True)
        if not 4096 <= self.max_message_bytes <= 64 * 1024 * 1024:
            raise _fail(src, "max_message_bytes", f"{self.max_message_bytes} must be within 4 KiB .. 64 MiB")
        check_listen_fields(src, self, "metrics", "status")   # loopback unless *_allow_remote; log_format
        if self.samples_dir is None:
            self.samples_dir = Path(self.db_path).parent / "samples"
        for name in ("samples_max_sample_bytes", "samples_max_total_bytes", "samples_max_partial_per_station"):
            _check_positive(src, name, getattr(self, name), integer=True)
        if self.samples_max_sample_bytes > self.samples_max_total_bytes:
            raise _fail(src, "samples_max_sample_bytes", f"{self.samples_max_sample_bytes} is over "
                        f"samples_max_total_bytes ({self.samples_max_total_bytes})")
        seen: set[str] = set()
        for i, st in enumerate(self.stations):
            _check_station_id(src, f"stations[{i}].id", st.id)
            if st.id in seen:
                raise _fail(src, f"stations[{i}].id", f"station {st.id!r} is listed twice")
            seen.add(st.id)
            for g in st.groups:
                if not isinstance(g, str) or not g:
                    raise _fail(src, f"stations[{i}].groups", f"{g!r} is not a group name")

    def allowed_keys(self, *, missing_ok: bool = False) -> dict[bytes, str]:
        """{z85 CURVE public key: station id}; ConfigError if a key file is bad or listed twice.

        missing_ok: skip key files that do not exist yet (config load on a machine being set up;
        the hub itself loads every key at start and refuses a missing one).
        """
        allowed: dict[bytes, str] = {}
        paths: dict[Path, str] = {}
        for i, st in enumerate(self.stations):
            if Path(st.public_key_file).resolve() in paths:
                raise _fail(self.source, f"stations[{i}].public_key_file",
                            f"{st.public_key_file} is also the key file of station "
                            f"{paths[Path(st.public_key_file).resolve()]!r}: one key per station")
            paths[Path(st.public_key_file).resolve()] = st.id
            if missing_ok and not Path(st.public_key_file).exists():
                continue
            try:
                key = load_curve_public(st.public_key_file)
            except KaizenError as err:
                raise _fail(self.source, f"stations[{i}].public_key_file", str(err)) from None
            if key in allowed:
                raise _fail(self.source, f"stations[{i}].public_key_file",
                            f"{st.public_key_file} is the same key as station {allowed[key]!r}: one "
                            "key per station (else one station could act as the other)")
            allowed[key] = st.id
        return allowed

    def station_ids(self) -> list[str]:
        return [s.id for s in self.stations]

    def resolve_targets(self, target: str) -> list[str]:
        """Station ids a publish target names: `@group`, or a glob over station ids."""
        if target.startswith("@"):
            return [s.id for s in self.stations if target[1:] in s.groups]
        return [s.id for s in self.stations if fnmatch.fnmatchcase(s.id, target)]


def load_hub_config(path: str | Path) -> HubConfig:
    """Read a hub.toml: top-level hub fields plus [[stations]] tables {id, public_key_file, groups}."""
    path = Path(path)
    data = _read_toml(path)
    base = path.resolve().parent
    raw = data.pop("stations", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: field 'stations' must be an array of tables ([[stations]])")
    stations = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: field 'stations[{i}]' must be a table")
        st = _build(AllowedStation, entry, str(path), f"stations[{i}]", ("public_key_file",), base)
        if not isinstance(st.groups, list):
            raise ConfigError(f"{path}: field 'stations[{i}].groups' must be a list of names")
        stations.append(st)
    config = _build(HubConfig, data, str(path), "", HUB_PATHS, base, extra={"stations": stations})
    config.allowed_keys(missing_ok=True)   # refuse unreadable or duplicate station keys now, not at the first handshake
    return config

