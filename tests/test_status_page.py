"""The hub's status page in a real headless browser, against a live hub with three stations.

`kaizen hub serve` runs as a process (hub.toml with status_listen and metrics_listen), three
station daemons run as threads (hub/fleet_sim.py), packs are published and delivered; then
Debian's chromium reads the page (--dump-dom) and keeps a screenshot (--screenshot), copied to
this test's tmp folder as status.png. Skipped only when /usr/bin/chromium is absent
(`make test` installs it). Every wait and subprocess is bounded.

    .venv/bin/python -m pytest -q tests/test_status_page.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kaizen.hub.db import HubDB
from kaizen.hub.fleet_sim import Fleet, free_ports, make_test_packs, wait_until, write_hub_toml
from kaizen.hub.status_page import render_html
from kaizen.runtime.keys import TrustedKeys, generate_signing_key

CHROMIUM = Path("/usr/bin/chromium")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars"]
FP = "test-base-fp"
WAIT = 30.0
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror="alert(1)"> & "quotes"'


class _Dom(HTMLParser):
    """Rows of the page's tables: data-station rows with their pack states, data-pack rows."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.stations: dict[str, dict] = {}
        self.packs: dict[str, str] = {}
        self._row: tuple[str, str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and "data-station" in a:
            self._row = ("station", a["data-station"])
            self.stations[a["data-station"]] = {"connected": a.get("data-connected"), "states": {}}
            self._text = []
        elif tag == "tr" and "data-pack" in a:
            self._row = ("pack", a["data-pack"])
            self._text = []
        elif tag == "span" and "data-state" in a and self._row and self._row[0] == "station":
            self.stations[self._row[1]]["states"][a["data-pack"]] = a["data-state"]

    def handle_data(self, data):
        if self._row:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            kind, key = self._row
            text = " ".join("".join(self._text).split())
            if kind == "pack":
                self.packs[key] = text
            else:
                self.stations[key]["text"] = text
            self._row = None


def chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *CHROME_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def http_get(url: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def live_fleet(tmp_path):
    """A `kaizen hub serve` process + 3 station daemons; packs pick-1 (to line1), count-1 (to all),
    and a pack signed by an untrusted key (rejected by the stations)."""
    signer, stranger = generate_signing_key(), generate_signing_key()
    packs = make_test_packs(tmp_path / "packs", signer, [("pick", 1), ("count", 1)], base_fingerprint=FP, layers=2)
    (bad,) = make_test_packs(tmp_path / "bad", stranger, [("seal", 1)], base_fingerprint=FP, layers=2)
    groups = {"line1/s00": ["line1", "paint-shop"], "line2/s01": ["line2"], "line1/s02": ["line1"]}
    fleet = Fleet(tmp_path / "fleet", 3, TrustedKeys([signer.public_key()]), FP, chunk_size=32 * 1024,
                  groups=groups)
    status_port, metrics_port = free_ports(2)
    hub_toml = write_hub_toml(fleet, tmp_path / "hub.toml")
    hub_toml.write_text(f'status_listen = "127.0.0.1:{status_port}"\nmetrics_listen = "127.0.0.1:{metrics_port}"\n'
                        + hub_toml.read_text())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "kaizen.runtime.cli", "hub", "serve", "--config", str(hub_toml)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{status_port}"
    try:
        def up() -> bool:
            try:
                return http_get(base + "/status.json", timeout=2)[0] == 200
            except OSError:
                return proc.poll() is not None   # exited: fail below with its output
        assert wait_until(up, WAIT, step=0.2) and proc.poll() is None, "hub did not start its status page"
        for i in range(3):
            fleet.start_station(i)
        fleet.publish(packs[0], "@line1")
        fleet.publish(packs[1], "*")
        fleet.publish(bad, "line2/*")
        sids = fleet.station_ids

        def delivered() -> bool:
            rows = {r["station_id"]: {n: p["state"] for n, p in r["packs"].items()} for r in fleet.status()}
            return (rows[sids[0]] == rows[sids[2]] == {"pick-1.kpk": "activated", "count-1.kpk": "activated"}
                    and rows[sids[1]] == {"count-1.kpk": "activated", "seal-1.kpk": "rejected"})
        assert wait_until(delivered, WAIT), fleet.status()
        fleet.stop_station(2)   # still listed, shown as not connected once its heartbeat is old
        db = HubDB(fleet.hub_config.db_path)   # a station's hostile reason text, as the hub stores it
        try:
            db.record_report(sids[1], "seal-1.kpk", "seal", 1, "rejected", HOSTILE)
        finally:
            db.close()

        def shown() -> bool:   # the page caches its database read for a second
            snap = json.loads(http_get(base + "/status.json")[2])
            return any(p["reason"] == HOSTILE for s in snap["stations"] for p in s["packs"].values())
        assert wait_until(shown, 10.0, step=0.2)
        yield {"fleet": fleet, "base": base, "metrics": f"http://127.0.0.1:{metrics_port}", "proc": proc}
    finally:
        fleet.close()
        proc.send_signal(signal.SIGTERM)
        try:
            out = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate(timeout=10)[0]
        assert proc.returncode == 0, out


def test_status_json_and_headers(live_fleet):
    status, headers, body = http_get(live_fleet["base"] + "/status.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    snap = json.loads(body)
    packs = {p["name"]: p for p in snap["packs"]}
    assert (packs["pick-1.kpk"]["activated"], packs["pick-1.kpk"]["targeted"]) == (2, 2)
    assert (packs["count-1.kpk"]["activated"], packs["count-1.kpk"]["targeted"]) == (3, 3)
    assert packs["seal-1.kpk"]["states"] == {"rejected": 1} and packs["seal-1.kpk"]["targeted"] == 1
    assert {g["group"]: g["stations"] for g in snap["groups"]} == {"line1": 2, "line2": 1, "paint-shop": 1}
    status, headers, page = http_get(live_fleet["base"] + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    text = page.decode()
    assert "<script" not in text and "http://" not in text and "https://" not in text   # no external assets
    assert "&lt;script&gt;" in text
    assert http_get(live_fleet["base"] + "/nothing-here")[0] == 404


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (make test installs "
                    "Debian's chromium package: apt-get install chromium)")
def test_status_page_in_headless_chromium(live_fleet, tmp_path):
    fleet, url = live_fleet["fleet"], live_fleet["base"] + "/"
    sids = fleet.station_ids
    profile = tmp_path / "chromium-profile"
    got = chromium(["--dump-dom", url], profile)
    assert got.returncode == 0, got.stderr[-2000:]
    dom = _Dom()
    dom.feed(got.stdout)
    assert "script" not in dom.tags and "img" not in dom.tags   # the hostile reason stayed text
    assert set(dom.stations) == set(sids)
    assert dom.stations[sids[0]]["states"] == {"pick-1.kpk": "activated", "count-1.kpk": "activated"}
    assert dom.stations[sids[1]]["states"] == {"count-1.kpk": "activated", "seal-1.kpk": "rejected"}
    assert HOSTILE in dom.stations[sids[1]]["text"]   # shown verbatim, as text
    assert dom.stations[sids[0]]["connected"] == "1" and "line1, paint-shop" in dom.stations[sids[0]]["text"]
    assert "2 / 2" in dom.packs["pick-1.kpk"] and "3 / 3" in dom.packs["count-1.kpk"]
    assert "0 / 1" in dom.packs["seal-1.kpk"] and "rejected: 1" in dom.packs["seal-1.kpk"]

    shot = tmp_path / "shot" / "status.png"
    shot.parent.mkdir()
    got = chromium([f"--screenshot={shot}", "--window-size=1280,900", url], profile)
    assert got.returncode == 0 and shot.is_file(), got.stderr[-2000:]
    assert png_size(shot) == (1280, 900) and shot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, "the screenshot is (nearly) blank"
    shutil.copy(shot, tmp_path / "status.png")


def test_page_escapes_and_bounds_hostile_rows():
    """Unit level: hostile strings in every field come out escaped; many stations are cut."""
    evil = '"><script>x</script>'
    row = {"station_id": evil, "allowed": False, "groups": [evil], "last_seen": 1.0, "seen_ago_s": 3.0,
           "connected": True, "installed": [],
           "packs": {evil + f"{i}.kpk": {"task_id": evil, "version": 1, "state": evil, "reason": evil} for i in range(60)}}
    snap = {"generated_at": 0.0, "connected_within_s": 30.0, "stations": [row] * 1200, "groups": [],
            "packs": [{"name": evil, "task_id": evil, "version": 1, "size": 1, "targeted": 0, "activated": 0,
                       "states": {evil: 1}, "rejected": [{"station_id": evil, "reason": evil}]}],
            "packs_truncated": 0,
            "totals": {"allowed": 0, "seen": 1, "connected": 1, "packs": 1, "deliveries": {}}}
    page = render_html(snap)
    assert "<script>" not in page and evil not in page and "&quot;&gt;&lt;script&gt;x&lt;/script&gt;" in page
    assert page.count("<tr data-station=") == 1000 and "200 more stations not shown" in page
    assert "+20 more" in page


def test_fleet_view_reads_only(tmp_path):
    """The view never creates or writes the hub database (mode=ro), and an absent one is an empty fleet."""
    from kaizen.hub.config import AllowedStation, HubConfig
    from kaizen.hub.db import PackRecord
    from kaizen.hub.fleet_view import FleetView, ReadOnlyHubDB
    from kaizen.runtime.keys import generate_curve_keypair

    generate_curve_keypair(tmp_path / "keys", "hub")
    generate_curve_keypair(tmp_path / "keys", "s0")
    config = HubConfig(bind="tcp://127.0.0.1:1", pub_bind="tcp://127.0.0.1:2", public_key_file=tmp_path / "keys/hub.pub",
                       secret_key_file=tmp_path / "keys/hub.key", packs_dir=tmp_path / "packs",
                       db_path=tmp_path / "hub" / "hub.sqlite",
                       stations=[AllowedStation("line1/s00", tmp_path / "keys/s0.pub", ["line1"])])
    snap = FleetView(config).snapshot()
    assert not config.db_path.exists() and snap["packs"] == [] and snap["totals"]["allowed"] == 1
    assert snap["stations"][0]["last_seen"] is None and "never" in render_html(snap)
    HubDB(config.db_path).close()
    ro = ReadOnlyHubDB(config.db_path)
    try:
        with pytest.raises(Exception, match="readonly"):
            ro.add_pack(PackRecord("a-1.kpk", "0" * 64, 1, "a", 1, "/nowhere"))
    finally:
        ro.close()
    snap = FleetView(config).snapshot()
    assert [s["station_id"] for s in snap["stations"]] == ["line1/s00"] and snap["groups"][0]["group"] == "line1"
