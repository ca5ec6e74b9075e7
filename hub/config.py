"""The hub's service config: `hub.toml` read into a validated `HubConfig`.

    from kaizen.hub.config import load_hub_config
    hub = load_hub_config("deploy/hub.toml")           # -> HubConfig

Relative paths resolve against the TOML file's folder; every error is a ConfigError naming the
file and the field. See deploy/hub.toml for a commented example of every field.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from kaizen.runtime.config import _build, _check_endpoint, _check_positive, _check_station_id, _fail, _read_toml
from kaizen.runtime.errors import ConfigError

HUB_PATHS = ("public_key_file", "secret_key_file", "packs_dir", "db_path")


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
    chunk_size: int = 256 * 1024
    max_credit: int = 16                  # a fetch asking for more chunks gets this many
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
        seen: set[str] = set()
        for i, st in enumerate(self.stations):
            _check_station_id(src, f"stations[{i}].id", st.id)
            if st.id in seen:
                raise _fail(src, f"stations[{i}].id", f"station {st.id!r} is listed twice")
            seen.add(st.id)
            for g in st.groups:
                if not isinstance(g, str) or not g:
                    raise _fail(src, f"stations[{i}].groups", f"{g!r} is not a group name")

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
    return _build(HubConfig, data, str(path), "", HUB_PATHS, base, extra={"stations": stations})

