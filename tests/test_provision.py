"""deploy/provision.sh: valid bash with no network or service side effects; on a fresh root it
writes the station's CURVE keys, trusted signing keys and station.toml (which the hub side then
accepts as an allow-list entry), is idempotent, and refuses a half key pair.

Offline and fast: the script runs against a temporary --root with the venv's `kaizen` command.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kaizen.hub.config import load_hub_config
from kaizen.runtime.config import load_station_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VENV_BIN = ROOT / ".venv" / "bin"


def test_provision_script_is_valid_bash():
    script = DEPLOY / "provision.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert not re.search(r"\b(curl|wget|ssh|scp|rsync|systemctl (start|enable|restart))\b",
                         re.sub(r"(?m)^\s*#.*$|echo .*$|^  .*$", "", text))


def _provision(root: Path, *args: str):
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("KAIZEN", None)
    return subprocess.run(["bash", str(DEPLOY / "provision.sh"), "--root", str(root), *args],
                          check=False, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not (VENV_BIN / "kaizen").exists() and shutil.which("kaizen") is None,
                    reason="no kaizen command")
def test_provision_writes_keys_and_config_and_is_idempotent(tmp_path):
    from kaizen.runtime.keys import (
        TrustedKeys,
        generate_curve_keypair,
        generate_signing_key,
        load_curve_keypair,
        load_curve_public,
        save_signing_key,
    )

    _, hub_pub = generate_curve_keypair(tmp_path / "hubkeys", "hub")
    _, signing_pub = save_signing_key(generate_signing_key(), tmp_path / "signing", "trainer-2026")
    root = tmp_path / "root"
    args = ("--id", "line3/station-07", "--groups", "line3,paint-shop", "--hub-pub", str(hub_pub),
            "--trusted", str(signing_pub))
    first = _provision(root, *args)
    assert first.returncode == 0, first.stderr
    etc = root / "etc" / "kaizen"
    secret, public = etc / "keys" / "line3-station-07.key", etc / "keys" / "line3-station-07.pub"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (etc / "keys" / "hub.pub").read_bytes() == hub_pub.read_bytes()
    assert (etc / "keys" / "trusted" / "trainer-2026.ed25519.pub").read_bytes() == signing_pub.read_bytes()

    cfg = load_station_config(etc / "station.toml")
    assert cfg.station_id == "line3/station-07"
    assert cfg.secret_key_file == secret and cfg.public_key_file == public
    pub, _ = load_curve_keypair(cfg.secret_key_file)
    assert pub == load_curve_public(public) and load_curve_public(cfg.hub_public_key_file)
    assert len(TrustedKeys.from_dir(cfg.trusted_keys_dir)) == 1

    # The hub side: the snippet + public key make a valid allow-list entry.
    hub_dir = tmp_path / "hub"
    (hub_dir / "keys" / "stations").mkdir(parents=True)
    shutil.copy(etc / "for-hub" / "line3-station-07.pub", hub_dir / "keys" / "stations")
    (hub_dir / "hub.toml").write_text((DEPLOY / "hub.toml").read_text()
                                      + (etc / "for-hub" / "line3-station-07.stations.toml").read_text())
    hub = load_hub_config(hub_dir / "hub.toml")
    assert hub.resolve_targets("@paint-shop") == ["line1/station-01", "line3/station-07"]
    entry = next(s for s in hub.stations if s.id == "line3/station-07")
    assert load_curve_public(entry.public_key_file) == pub

    # Again: same keys, config untouched, still succeeds.
    before = {p: p.read_bytes() for p in (secret, public, etc / "station.toml")}
    (etc / "station.toml").write_text((etc / "station.toml").read_text() + "# edited by hand\n")
    before[etc / "station.toml"] = (etc / "station.toml").read_bytes()
    again = _provision(root, *args)
    assert again.returncode == 0, again.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_provision_refuses_a_half_key_pair(tmp_path):
    keys = tmp_path / "etc" / "kaizen" / "keys"
    keys.mkdir(parents=True)
    (keys / "line1-station-01.pub").write_text("x" * 40 + "\n")
    proc = _provision(tmp_path, "--id", "line1/station-01")
    assert proc.returncode != 0 and "only one of" in proc.stderr
