"""`kaizen demo`: the whole story on the built-in base (run.py), its fleet (fleet.py), its report (report.py)."""
