"""kaizen.hub: the fleet hub (no torch). Serves signed task packs to allow-listed stations.

    kaizen hub serve --config hub.toml
    kaizen hub publish PACK.kpk --to 'line1/*' --config hub.toml
    kaizen fleet status --config hub.toml

Modules: server.py (ROUTER + CURVE serve loop), db.py (SQLite state), auth.py (ZAP allow-list),
catalog.py (pack catalogue, status table), config.py (hub.toml), cli.py (commands),
fleet_sim.py (a whole fleet on loopback in one process, for tests and benches).
May import kaizen.runtime; never torch, transformers or the trainer.
"""
