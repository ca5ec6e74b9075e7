"""The hub's read-only status page: the fleet in one HTML page, plus the same data as JSON.

    kaizen hub serve --config hub.toml      # with status_listen = "127.0.0.1:8470" in hub.toml
    # then open http://127.0.0.1:8470/  (JSON: /status.json)

    server = serve_status_page(hub.config, FleetView(hub.config))   # None when status_listen = ""

Shows stations (id, groups, last seen, connected), a summary per group, and every pack with its
rollout progress (activated / targeted stations) and per-station state (pending, received,
verified, activated, rejected with its reason, rolled_back). The page refreshes itself every
REFRESH_S seconds (meta refresh). No external assets: inline CSS, no script, served with a
Content-Security-Policy that forbids loading anything. Every string from the database (station
ids, reasons, pack names: hostile input) is HTML-escaped; output is bounded (MAX_STATIONS rows,
FleetView's MAX_PACKS packs, MAX_CELLS pack cells per station). Read-only: FleetView opens the
database with mode=ro.
"""

from __future__ import annotations

import json
import time
from html import escape

from kaizen.runtime.metrics_http import HttpServer

from .fleet_view import FleetView

REFRESH_S = 5
MAX_STATIONS = 1000
MAX_CELLS = 40
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json"

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}.muted{color:#777}
.bar{display:inline-block;width:8em;height:.8em;background:#eee;border:1px solid #ccc;vertical-align:middle}
.bar>span{display:block;height:100%;background:#3a7}
.state{display:inline-block;margin:.1em .2em;padding:0 .4em;border-radius:.3em;background:#eee}
.state-activated{background:#c8ecd4}.state-rejected{background:#f6c9c9}.state-pending{background:#eee}
.state-received,.state-verified{background:#fbeec0}.state-rolled_back{background:#d9d4f5}
.yes{color:#197a3e;font-weight:600}.no{color:#a33;font-weight:600}.reason{color:#a33}
"""


def _e(value) -> str:
    return escape(str(value), quote=True)


def _ago(seconds) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _rollout(p: dict) -> str:
    """The staged-rollout state of a pack row (canary / held / promoted), or nothing."""
    if not p.get("rollout"):
        return ""
    why = f' <span class="reason">{_e(p["rollout_reason"])}</span>' if p.get("rollout_reason") else ""
    return f' <span class="rollout" data-rollout="{_e(p["rollout"])}">{_e(p["rollout"])}</span>{why}'


def _state(name: str, p: dict) -> str:
    reason = f' <span class="reason">({_e(p["reason"])})</span>' if p.get("reason") else ""
    return (f'<span class="state state-{_e(p["state"])}" data-pack="{_e(name)}" data-state="{_e(p["state"])}">'
            f'{_e(name)}: {_e(p["state"])}{reason}</span>')


def _samples_html(samples: dict | None) -> list[str]:
    """The "Captured parts" section: what stations uploaded for the improvement loop, per task."""
    if not samples:
        return []
    out = ["<h2>Captured parts</h2>",
           f'<p id="samples">{samples["stored"]} stored at the hub ({samples["labelled"]} labelled, '
           f'{samples["bytes"] / 1e6:.1f} MB); <span class="muted">kaizen hub samples list | export | import</span></p>']
    if samples.get("error"):
        out.append(f'<p class="reason">cannot read the sample store: {_e(samples["error"])}</p>')
    if samples["tasks"]:
        out.append('<table id="sample-tasks"><tr><th>task</th><th>stored</th><th>labelled</th><th>unlabelled</th></tr>')
        for t in samples["tasks"]:
            out.append(f'<tr data-sample-task="{_e(t["task"])}"><td>{_e(t["task"])}</td><td>{t["stored"]}</td>'
                       f'<td>{t["labelled"]}</td><td>{t["stored"] - t["labelled"]}</td></tr>')
        out.append("</table>")
    if samples.get("tasks_truncated"):
        out.append(f'<p class="muted">{samples["tasks_truncated"]} more tasks not shown.</p>')
    return out


def render_html(snap: dict) -> str:
    """The whole page for one FleetView snapshot."""
    t = snap["totals"]
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap["generated_at"]))
    out = ['<!doctype html><html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="refresh" content="{REFRESH_S}">',
           f"<title>Kaizen fleet</title><style>{CSS}</style></head><body>",
           "<h1>Kaizen fleet</h1>",
           f'<p id="summary">{t["connected"]} of {t["allowed"]} allow-listed stations connected '
           f'({t["seen"]} ever seen), {t["packs"]} packs. <span class="muted">Generated {generated}; '
           f'refreshes every {REFRESH_S} s; connected = heard from within {snap["connected_within_s"]:.0f} s.'
           "</span></p>"]
    out += ["<h2>Rollouts</h2>", '<table id="packs"><tr><th>pack</th><th>task</th><th>version</th><th>bytes</th>'
            "<th>progress (activated / targeted)</th><th>states</th><th>rejections</th></tr>"]
    for p in snap["packs"]:
        share = 100.0 * p["activated"] / p["targeted"] if p["targeted"] else 0.0
        states = " ".join(f"{_e(k)}: {v}" for k, v in sorted(p["states"].items())) or '<span class="muted">-</span>'
        rejected = "<br>".join(f'{_e(r["station_id"])}: <span class="reason">{_e(r["reason"])}</span>'
                               for r in p["rejected"]) or '<span class="muted">-</span>'
        out.append(f'<tr data-pack="{_e(p["name"])}"><td>{_e(p["name"])}</td><td>{_e(p["task_id"])}</td>'
                   f'<td>{_e(p["version"])}</td><td>{_e(p["size"])}</td>'
                   f'<td><span class="bar"><span style="width:{share:.0f}%"></span></span> '
                   f'<span class="progress">{p["activated"]} / {p["targeted"]}</span>{_rollout(p)}</td>'
                   f"<td>{states}</td><td>{rejected}</td></tr>")
    if not snap["packs"]:
        out.append('<tr><td colspan="7" class="muted">no packs published yet</td></tr>')
    out.append("</table>")
    if snap.get("packs_truncated"):
        out.append(f'<p class="muted">{snap["packs_truncated"]} older packs not shown.</p>')
    out += _samples_html(snap.get("samples"))
    out += ["<h2>Groups</h2>", '<table id="groups"><tr><th>group</th><th>stations</th><th>connected</th>'
            "<th>desired packs by state</th></tr>"]
    for g in snap["groups"]:
        states = " ".join(f"{_e(k)}: {v}" for k, v in sorted(g["states"].items())) or '<span class="muted">-</span>'
        out.append(f'<tr data-group="{_e(g["group"])}"><td>{_e(g["group"])}</td><td>{g["stations"]}</td>'
                   f'<td>{g["connected"]}</td><td>{states}</td></tr>')
    out.append("</table>")
    out += ["<h2>Stations</h2>", '<table id="stations"><tr><th>station</th><th>groups</th><th>last seen</th>'
            "<th>connected</th><th>packs</th></tr>"]
    for s in snap["stations"][:MAX_STATIONS]:
        cells = [_state(n, p) for n, p in list(s["packs"].items())[:MAX_CELLS]]
        if len(s["packs"]) > MAX_CELLS:
            cells.append(f'<span class="muted">+{len(s["packs"]) - MAX_CELLS} more</span>')
        conn = '<span class="yes">yes</span>' if s["connected"] else '<span class="no">no</span>'
        allowed = "" if s["allowed"] else ' <span class="muted">(not allow-listed)</span>'
        out.append(f'<tr data-station="{_e(s["station_id"])}" data-connected="{int(s["connected"])}">'
                   f'<td>{_e(s["station_id"])}{allowed}</td><td>{_e(", ".join(s["groups"])) or "-"}</td>'
                   f'<td>{_ago(s["seen_ago_s"])}</td><td>{conn}</td><td>{" ".join(cells) or "-"}</td></tr>')
    out.append("</table>")
    if len(snap["stations"]) > MAX_STATIONS:
        out.append(f'<p class="muted">{len(snap["stations"]) - MAX_STATIONS} more stations not shown.</p>')
    out.append("</body></html>\n")
    return "".join(out)


class StatusPage:
    """The routes of the status server: / (HTML) and /status.json."""

    def __init__(self, view: FleetView):
        self.view = view

    def html(self) -> tuple[str, bytes]:
        return HTML_TYPE, render_html(self.view.snapshot()).encode()

    def json(self) -> tuple[str, bytes]:
        snap = self.view.snapshot()
        return JSON_TYPE, json.dumps({**snap, "stations": snap["stations"][:MAX_STATIONS]}).encode()

    def routes(self) -> dict:
        return {"/": self.html, "/index.html": self.html, "/status.json": self.json}


def serve_status_page(config, view: FleetView) -> HttpServer | None:
    """Start the status page on hub.toml's status_listen; None when it is "" (off)."""
    if not config.status_listen:
        return None
    server = HttpServer(config.status_listen, StatusPage(view).routes(), allow_remote=config.status_allow_remote,
                        name="hub-status", source=config.source, field="status_listen")
    return server.start()


def start_observers(hub) -> list[HttpServer]:
    """For `kaizen hub serve`: the metrics server (metrics_listen) and the status page
    (status_listen) of hub.toml, sharing one FleetView; the ones that are "" are not started."""
    from .metrics import serve_hub_metrics

    view = FleetView(hub.config)
    servers = []
    try:
        for start in (lambda: serve_hub_metrics(hub, view), lambda: serve_status_page(hub.config, view)):
            server = start()
            if server is not None:
                servers.append(server)
    except Exception:
        for server in servers:
            server.stop()
        raise
    return servers
