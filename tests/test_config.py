"""Service configs: station.toml / hub.toml load, resolve paths, and name the file and field on errors."""

from pathlib import Path

import pytest

from kaizen.hub.config import HubConfig, load_hub_config
from kaizen.runtime.config import StationConfig, load_station_config
from kaizen.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

STATION = """
station_id = "line1/s01"
hub_endpoint = "tcp://127.0.0.1:7700"
hub_public_key_file = "keys/hub.pub"
public_key_file = "keys/s01.pub"
secret_key_file = "keys/s01.key"
bundle_dir = "bundle"
store_dir = "store"
trusted_keys_dir = "keys/trusted"
state_dir = "fleet"
"""

HUB = """
bind = "tcp://127.0.0.1:7700"
pub_bind = "tcp://127.0.0.1:7701"
public_key_file = "keys/hub.pub"
secret_key_file = "keys/hub.key"
packs_dir = "packs"
db_path = "hub.sqlite"

[[stations]]
id = "line1/s01"
public_key_file = "keys/s01.pub"
groups = ["line1", "paint"]

[[stations]]
id = "line1/s02"
public_key_file = "keys/s02.pub"

[[stations]]
id = "line2/s01"
public_key_file = "keys/l2s01.pub"
groups = ["paint"]
"""


def write(tmp_path, name, text):
    path = tmp_path / "conf" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_deploy_examples_parse():
    station = load_station_config(ROOT / "deploy" / "station.toml")
    hub = load_hub_config(ROOT / "deploy" / "hub.toml")
    assert isinstance(station, StationConfig) and isinstance(hub, HubConfig)
    assert station.station_id in hub.station_ids()
    assert station.hub_public_key_file.is_absolute()
    assert hub.resolve_targets("line1/*") == ["line1/station-01", "line1/station-02"]


def test_station_defaults_and_relative_paths(tmp_path):
    cfg = load_station_config(write(tmp_path, "station.toml", STATION))
    assert cfg.store_dir == (tmp_path / "conf" / "store").resolve()
    assert cfg.hub_public_key_file == (tmp_path / "conf" / "keys" / "hub.pub").resolve()
    assert (cfg.credit, cfg.top_k, cfg.heartbeat_s) == (4, 0, 5.0)   # top_k 0: as each pack was trained


def test_station_table_form(tmp_path):
    cfg = load_station_config(write(tmp_path, "s.toml", "[station]\n" + STATION))
    assert cfg.station_id == "line1/s01"


def test_hub_stations_groups_and_targets(tmp_path):
    cfg = load_hub_config(write(tmp_path, "hub.toml", HUB))
    assert cfg.db_path == (tmp_path / "conf" / "hub.sqlite").resolve()
    assert cfg.stations[1].groups == []
    assert cfg.stations[0].public_key_file == (tmp_path / "conf" / "keys" / "s01.pub").resolve()
    assert cfg.resolve_targets("line1/*") == ["line1/s01", "line1/s02"]
    assert cfg.resolve_targets("@paint") == ["line1/s01", "line2/s01"]
    assert cfg.resolve_targets("*/s01") == ["line1/s01", "line2/s01"]
    assert cfg.resolve_targets("line9/*") == []


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace('station_id = "line1/s01"\n', ""), "station_id"),
    (lambda t: t + "credit = 0\n", "credit"),
    (lambda t: t + 'credit = "4"\n', "credit"),
    (lambda t: t + "heartbeat_s = -1\n", "heartbeat_s"),
    (lambda t: t + "hub_timeout_s = 1.0\n", "hub_timeout_s"),
    (lambda t: t + "threshold = 2.0\n", "threshold"),
    (lambda t: t + "colour = 'red'\n", "colour"),
    (lambda t: t.replace("tcp://127.0.0.1:7700", "127.0.0.1:7700"), "hub_endpoint"),
    (lambda t: t.replace('"line1/s01"', '"bad id!"'), "station_id"),
    (lambda t: t.replace('store_dir = "store"', "store_dir = 3"), "store_dir"),
    (lambda t: t + 'admin_endpoint = "tcp://127.0.0.1:7800"\n', "admin_endpoint"),
    (lambda t: t + 'admin_endpoint = "ipc://@kaizen-admin"\n', "admin_endpoint"),
    (lambda t: t + 'inference_endpoint = "ipc://@kaizen"\n', "inference_endpoint"),
])
def test_station_errors_name_file_and_field(tmp_path, edit, field):
    path = write(tmp_path, "station.toml", edit(STATION))
    with pytest.raises(ConfigError) as err:
        load_station_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace('pub_bind = "tcp://127.0.0.1:7701"', 'pub_bind = "tcp://127.0.0.1:7700"'), "pub_bind"),
    (lambda t: t.replace('id = "line1/s02"', 'id = "line1/s01"'), "stations[1].id"),
    (lambda t: t.replace('public_key_file = "keys/s02.pub"\n', ""), "stations[1]"),
    (lambda t: t.replace('groups = ["paint"]', 'groups = "paint"'), "stations[2].groups"),
    (lambda t: t.replace('db_path = "hub.sqlite"\n', 'db_path = "hub.sqlite"\nchunk_size = 10\n'), "chunk_size"),
    (lambda t: t.replace("[[stations]]\nid = \"line2/s01\"", "[[stations]]\nname = \"x\"\nid = \"line2/s01\""),
     "stations[2].'name'"),
    (lambda t: t.replace('"keys/s02.pub"', '"keys/s01.pub"'), "stations[1].public_key_file"),
    (lambda t: t.replace('db_path = "hub.sqlite"\n', 'db_path = "hub.sqlite"\nmax_message_bytes = 100\n'),
     "max_message_bytes"),
])
def test_hub_errors_name_file_and_field(tmp_path, edit, field):
    path = write(tmp_path, "hub.toml", edit(HUB))
    with pytest.raises(ConfigError) as err:
        load_hub_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_station_sockets_default_to_a_private_runtime_dir(tmp_path):
    cfg = load_station_config(write(tmp_path, "station.toml", STATION))
    run = (tmp_path / "conf" / "fleet" / "run").resolve()
    assert cfg.runtime_dir == run and "/tmp/" not in cfg.inference_endpoint.replace(str(tmp_path), "")
    assert cfg.inference_endpoint == f"ipc://{run}/station.ipc"
    assert cfg.admin_endpoint == f"ipc://{run}/admin/admin.ipc"
    cfg = load_station_config(write(tmp_path, "s2.toml", STATION + 'runtime_dir = "/run/kaizen"\n'))
    assert cfg.inference_endpoint == "ipc:///run/kaizen/station.ipc"


def test_hub_trusted_keys_dir_resolves_and_keys_must_differ(tmp_path):
    cfg = load_hub_config(write(tmp_path, "hub.toml", 'trusted_keys_dir = "keys/trusted"\n' + HUB))
    assert cfg.trusted_keys_dir == (tmp_path / "conf" / "keys" / "trusted").resolve()
    assert cfg.max_message_bytes == 1 << 20
    keys = tmp_path / "conf" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    from kaizen.runtime.keys import generate_curve_keypair

    generate_curve_keypair(keys, "s01")
    (keys / "s02.pub").write_bytes((keys / "s01.pub").read_bytes())   # same key, another file
    with pytest.raises(ConfigError, match="same key as station 'line1/s01'"):
        load_hub_config(tmp_path / "conf" / "hub.toml")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_station_config(tmp_path / "nope.toml")
    bad = write(tmp_path, "bad.toml", "station_id = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_hub_config(bad)


def test_station_providers_and_threads_are_validated(tmp_path):
    from kaizen.runtime.config import load_station_config
    from kaizen.runtime.errors import ConfigError

    base = ('station_id = "line1/s1"\nhub_endpoint = "tcp://127.0.0.1:9"\nhub_public_key_file = "h.pub"\n'
            'public_key_file = "s.pub"\nsecret_key_file = "s.key"\nbundle_dir = "b"\nstore_dir = "st"\n'
            'trusted_keys_dir = "t"\nstate_dir = "f"\n')
    ok = tmp_path / "ok.toml"
    ok.write_text(base + 'providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]\nthreads = 1\n')
    cfg = load_station_config(ok)
    assert cfg.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"] and cfg.threads == 1
    bad = tmp_path / "bad.toml"
    bad.write_text(base + 'providers = ["cuda"]\n')
    with pytest.raises(ConfigError, match=r"bad.toml.*providers"):
        load_station_config(bad)
    bad.write_text(base + "threads = -1\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*threads"):
        load_station_config(bad)
