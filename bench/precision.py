"""Benchmark: the accuracy cost of a lower-precision bundle (fp16 or int8) on a trained run.

    .venv/bin/python bench/precision.py RUN FP32_BUNDLE OTHER_BUNDLE

Exports every task of RUN (a `kaizen train --method kaizen` run on the bundles' base) as a pack,
installs them into one Station per bundle, answers every test part of the run's stream on both,
and prints accuracy for each and the share of identical answers. Writes
reports/bench/precision-<precision>.json.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from kaizen.export.pack_export import export_pack, find_task_dir
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.station import Station
from kaizen.trainer.data.stream import resolve_stream
from kaizen.trainer.data.types import normalize_answer


def answers_on(bundle: str, run: Path, res: dict, tasks, key) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        st = Station(bundle, Path(d) / "store", TrustedKeys([key.public_key()]), threshold=-1.0, threads=1)
        for t in res["stream"]:
            export_pack(find_task_dir(run, t), Path(d) / f"{t}.kpk", bundle=st.bundle, signing_key=key)
            st.install(Path(d) / f"{t}.kpk")
        out = []
        for task in tasks:
            pngs = []
            for s in task.test:
                buf = io.BytesIO()
                Image.fromarray(s.load_image()).save(buf, format="PNG")
                pngs.append(buf.getvalue())
            out += [r["answer"] for r in st.infer_batch(pngs, [s.instruction for s in task.test])]
        st.close()
    return out


def main() -> None:
    run, fp32, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    name = json.loads((Path(other) / "base.json").read_text())["precision"]
    res = json.loads((run / "results.json").read_text())
    cfg = res["config"]
    tasks = resolve_stream(cfg["stream"], seed=cfg["seed"], n_train=cfg["n_train"], n_test=cfg["n_test"])
    gold = [s.answer for t in tasks for s in t.test]
    key = generate_signing_key()
    got = {"fp32": answers_on(fp32, run, res, tasks, key), name: answers_on(other, run, res, tasks, key)}
    acc = {n: 100 * float(np.mean([normalize_answer(a) == normalize_answer(g) for a, g in zip(v, gold)]))
           for n, v in got.items()}
    same = 100 * float(np.mean([a == b for a, b in zip(got["fp32"], got[name])]))
    print(f"| bundle | accuracy % |\n|---|---|\n| fp32 | {acc['fp32']:.1f} |\n| {name} | {acc[name]:.1f} |")
    print(f"{name} answers identical to fp32 on {same:.1f} % of {len(gold)} test parts")
    out = Path("reports/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"precision-{name}.json").write_text(json.dumps({"accuracy": acc, "identical_pct": same, "parts": len(gold)}, indent=2))


if __name__ == "__main__":
    main()
