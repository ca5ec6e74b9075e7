"""Benchmark: the accuracy cost of lower-precision bundles (fp16, int8, int4) on a trained run.

    .venv/bin/python bench/precision.py RUN FP32_BUNDLE OTHER_BUNDLE [OTHER_BUNDLE ...] \
        [--report precision_int4] [--append] [--title TEXT]

Exports every task of RUN (a `kaizen train --method kaizen` run on the bundles' base) as a pack,
installs them into one Station per bundle (1 thread), answers every test part of the run's stream
one part per call (as a station is asked), and prints per bundle: accuracy, share of answers
identical to fp32, bundle MB and decoder.onnx MB, the export's parity figures (parity.json), and
the per-part p50 (whole part, and its decoder part: the station's decode_ms), and which packs the
station's golden-sample probe refuses on that bundle (then installed without the probe). Writes
reports/bench/<report>.json and <report>.md (--append adds a section to the .md).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from common import OUT, load, median
from PIL import Image

from kaizen.export.pack_export import export_pack, find_task_dir
from kaizen.runtime.errors import PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.station import Station
from kaizen.trainer.data.stream import resolve_stream
from kaizen.trainer.data.types import normalize_answer


def test_parts(tasks) -> list[tuple[bytes, str, str]]:
    """(PNG bytes, instruction, gold answer) of every test sample of the stream."""
    parts = []
    for task in tasks:
        for s in task.test:
            buf = io.BytesIO()
            Image.fromarray(s.load_image()).save(buf, format="PNG")
            parts.append((buf.getvalue(), s.instruction, s.answer))
    return parts


def run_bundle(bundle: str, run: Path, res: dict, parts, key) -> dict:
    """Answers and per-part timings of one bundle's station."""
    with tempfile.TemporaryDirectory() as d:
        st = Station(bundle, Path(d) / "store", TrustedKeys([key.public_key()]), threshold=-1.0, threads=1)
        refused = []  # a pack the golden probe refuses is noted, then installed without the probe
        for t in res["stream"]:
            export_pack(find_task_dir(run, t), Path(d) / f"{t}.kpk", bundle=st.bundle, signing_key=key)
            try:
                st.install(Path(d) / f"{t}.kpk")
            except PackError:
                refused.append(t)
                st.probe_golden = False
                st.install(Path(d) / f"{t}.kpk")
                st.probe_golden = True
        st.infer_batch([parts[0][0]], [parts[0][1]])  # warm-up: sessions, arenas
        answers, total, decode = [], [], []
        for png, instruction, _ in parts:
            r = st.infer_batch([png], [instruction])[0]
            answers.append(r.get("answer"))
            total.append(r["timings_ms"]["total_ms"])
            decode.append(r["timings_ms"]["decode_ms"])
        meta = st.bundle.meta
        st.close()
    parity_path = Path(bundle) / "parity.json"
    parity = json.loads(parity_path.read_text()) if parity_path.exists() else {}
    return {"bundle": str(bundle), "precision": meta["precision"], "answers": answers,
            "bundle_mb": sum((Path(bundle) / f).stat().st_size for f in meta["files"]) / 1e6,
            "decoder_mb": (Path(bundle) / "decoder.onnx").stat().st_size / 1e6,
            "golden_probe_would_refuse": refused, "p50_part_ms": median(total), "p50_decode_ms": median(decode),
            "parity_max_abs_diff": parity.get("max_abs_diff_logits"),
            "parity_argmax_agreement": parity.get("argmax_agreement"),
            "parity_tokens_equal": parity.get("tokens_equal")}


def table(rows: list[dict], n: int) -> str:
    lines = ["| bundle | accuracy % | answers identical to fp32 | bundle MB | decoder.onnx MB | p50 part ms | "
             "p50 decoder ms | parity max \\|diff\\| logits | parity argmax agreement | greedy tokens equal | "
             "packs the golden probe refuses |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = r["parity_argmax_agreement"]
        diff = r["parity_max_abs_diff"]
        lines.append(f"| {r['precision']} | {r['accuracy']:.1f} | {r['identical_pct']:.1f} % | {r['bundle_mb']:.2f} | "
                     f"{r['decoder_mb']:.3f} | {r['p50_part_ms']:.1f} | {r['p50_decode_ms']:.1f} | "
                     f"{'-' if diff is None else f'{diff:.2g}'} | {'-' if agree is None else f'{agree:.3f}'} | "
                     f"{'-' if r['parity_tokens_equal'] is None else ('yes' if r['parity_tokens_equal'] else 'no')} | "
                     f"{', '.join(r['golden_probe_would_refuse']) or 'none'} |")
    return "\n".join(lines) + f"\n\n{n} test parts, one per call, 1 thread per station.\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `kaizen train --method kaizen` run folder on the bundles' base")
    ap.add_argument("fp32", help="the fp32 bundle of that base")
    ap.add_argument("others", nargs="+", help="lower-precision bundles of the same base (fp16, int8, int4)")
    ap.add_argument("--report", default="precision", help="report name under reports/bench/ (.json, .md)")
    ap.add_argument("--append", action="store_true", help="add a section to an existing <report>.md")
    ap.add_argument("--title", default="", help="section title in the .md (default: the run folder)")
    a = ap.parse_args(argv)
    res = json.loads((a.run / "results.json").read_text())
    cfg = res["config"]
    tasks = resolve_stream(cfg["stream"], seed=cfg["seed"], n_train=cfg["n_train"], n_test=cfg["n_test"])
    parts = test_parts(tasks)
    gold = [normalize_answer(g) for _, _, g in parts]
    key = generate_signing_key()
    rows = [run_bundle(b, a.run, res, parts, key) for b in [a.fp32, *a.others]]
    for r in rows:
        r["accuracy"] = 100 * float(np.mean([normalize_answer(x or "") == g for x, g in zip(r["answers"], gold)]))
        r["identical_pct"] = 100 * float(np.mean([x == y for x, y in zip(r["answers"], rows[0]["answers"])]))
    text = table(rows, len(parts))
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    data = {"run": str(a.run), "base": cfg["base"], "parts": len(parts), "load": load(),
            "rows": [{k: v for k, v in r.items() if k != "answers"} for r in rows]}
    (OUT / f"{a.report}.json").write_text(json.dumps(data, indent=2))
    section = (f"## {a.title or a.run}\n\nbase {cfg['base']}, stream {cfg['stream']} (seed {cfg['seed']}), "
               f"load {data['load']['loadavg_1m']} on {data['load']['cpus']} CPUs at {data['load']['at']}\n\n{text}\n")
    md = OUT / f"{a.report}.md"
    if a.append and md.exists():
        md.write_text(md.read_text() + "\n" + section)
    else:
        md.write_text("# Bundle precision: accuracy on a trained run\n\nWritten by `bench/precision.py`.\n\n" + section)


if __name__ == "__main__":
    main()
