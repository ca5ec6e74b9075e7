"""kaizen.hub: the fleet hub (no torch). Serves signed task packs to allow-listed stations.

    kaizen hub serve --config hub.toml
    kaizen hub publish PACK.kpk --to 'line1/*' --config hub.toml
    kaizen hub publish PACK.kpk --to 'line1/*' --canary 1 --config hub.toml; kaizen hub promote TASK ...
    kaizen hub rollback TASK --to VERSION [--to-group G] ...; kaizen hub unpublish TASK[@VERSION] ...
    kaizen fleet status --config hub.toml [--json [--all]]

Modules: server.py (ROUTER + CURVE serve loop), db.py (SQLite state), auth.py (ZAP allow-list),
catalog.py (pack catalogue, status table), fleet_ops.py (unpublish, rollback, canary rollout,
promote, hold), config.py (hub.toml), cli.py (commands), fleet_view.py + status_page.py +
metrics.py (read-only status page and Prometheus metrics),
fleet_sim.py (a whole fleet on loopback in one process, for tests and benches).
May import kaizen.runtime; never torch, transformers or the trainer.
"""
