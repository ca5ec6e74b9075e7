"""`kaizen train`: train one continual method over a task stream, evaluating after each task.

    kaizen train --method kaizen --stream inspection --base bases/tiny --out runs/kaizen-s0 --seed 0
    kaizen train ... --resume          # continue a crashed run from its last finished task
    kaizen train --continue RUN --task T --add DATA.json   # T's next pack version (continue_run.py)

Tasks run in stream order. After each task: evaluate (evaluate.py), checkpoint
(checkpoint.py), update RUN/run.json. At the end: RUN/results.json, results.md, matrix.png
(report.py). The frozen base's features are cached once (features.py). Deterministic on CPU
for a given seed. Runs unchanged under `accelerate launch` (accel.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from kaizen.runtime.errors import ConfigError

from . import checkpoint as ck
from . import report
from .accel import Dist
from .evaluate import evaluate_row
from .methods import METHODS, Context, MethodConfig, build_method
from .methods.base import base_method_defaults
from .pack_meta import write_pack_meta
from .progress import progress

RESUME_FREE = ("out", "threads", "eval_batch_size")  # may change between a run and its resume


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in run.json; a resume must match it)."""

    base: str
    out: str
    method: str = "kaizen"
    stream: str = "inspection"
    clip: str = ""  # default: <base>/clip
    seed: int = 0
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 16
    n_train: int = 160
    n_test: int = 40
    max_tasks: int = 0  # 0 = the whole stream
    full_matrix: bool = True
    eval_batch_size: int = 32
    threads: int = 1  # measured: 1 thread beats 2 for the tiny base on a shared 2-core box
    options: dict = field(default_factory=dict)  # MethodConfig fields

    def __post_init__(self):
        if self.stream == "builtin":
            self.stream = "inspection"
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; choose one of {sorted(METHODS)}")
        for name in ("epochs", "batch_size", "n_train", "n_test", "eval_batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train option {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.max_tasks < 0:
            raise ConfigError("train options: lr must be > 0 and max_tasks >= 0")
        if not self.base or not self.out:
            raise ConfigError("train needs --base (a base folder) and --out (the run folder)")
        self.method_config()

    def method_config(self, base_defaults: dict | None = None) -> MethodConfig:
        """The method's options: the base's declared defaults (kaizen_base.json method_defaults),
        overridden by this run's explicit `options`."""
        return MethodConfig.from_dict({**(base_defaults or {}), **self.options})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _warn_older_recipe(base) -> None:
    """Say so when the base was built by an older recipe of its built-in preset (it still trains)."""
    from .presets import recipe_drift

    recorded = base.info.get("preset") or {}
    drift = recipe_drift(recorded)
    if drift:
        why = "; fixed_head lets packs learn answer words stage 1 never produced" if "fixed_head" in drift else ""
        print(f"warning: {base.path} was built by an older recipe of preset {recorded.get('name')} (differs in: "
              f"{', '.join(drift)}); build it anew (kaizen base assemble/init + pretrain) for today's{why}",
              file=sys.stderr)


class Shared:
    """Frozen pieces several runs can share in one process: base, CLIP, features, streams."""

    def __init__(self, base_dir: str, clip_dir: str = ""):
        from kaizen.export.loading import base_fingerprint, load_query

        from .bases import load_base
        from .features import FeatureCache

        self.base = load_base(base_dir)
        _warn_older_recipe(self.base)
        self.clip = load_query(self.base, clip_dir or None)  # a CLIP, or the base's unaligned encoders
        self.fingerprint = base_fingerprint(self.base, self.clip)  # before any LoRA slot is added
        self.features = FeatureCache(self.base, self.clip)
        self._streams: dict[tuple, list] = {}

    def stream(self, cfg: TrainConfig) -> list:
        from .data.stream import resolve_stream

        key = (cfg.stream, cfg.seed, cfg.n_train, cfg.n_test, cfg.max_tasks)
        if key not in self._streams:
            tasks = resolve_stream(cfg.stream, seed=cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test)
            self._streams[key] = tasks[: cfg.max_tasks] if cfg.max_tasks else tasks
        return self._streams[key]


class Session:
    """One run folder: config, frozen pieces, stream, method construction and restoring."""

    def __init__(self, cfg: TrainConfig, shared: Shared | None = None, dist: Dist | None = None):
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.run = Path(cfg.out)
        self.shared = shared or Shared(cfg.base, cfg.clip)
        self.features = self.shared.features
        self.tasks = self.shared.stream(cfg)
        self.dist = dist or Dist()
        base = self.shared.base
        self.method_cfg = cfg.method_config(base_method_defaults(base.info, f"{base.path}/kaizen_base.json"))
        self.state = {"config": cfg.to_dict(), "method": cfg.method, "stream": [t.task_id for t in self.tasks],
                      "base_fingerprint": self.shared.fingerprint, "method_config": self.method_cfg.to_dict(),
                      "rows": [], "status": "running"}

    @classmethod
    def from_run(cls, run_dir, shared: Shared | None = None) -> Session:
        state = ck.read_run(Path(run_dir))
        cfg = TrainConfig.from_dict(dict(state["config"], out=str(run_dir)))
        session = cls(cfg, shared)
        session.adopt(state)
        return session

    def adopt(self, state: dict) -> None:
        """Continue from a run's saved state, with the method options it was trained with (run.json
        method_config), whatever the base's kaizen_base.json says now. Refused when the base at the
        run's path is not the one the run was trained on (rebuilt, re-aligned or re-whitened)."""
        made_on = state.get("base_fingerprint")
        if made_on is not None and made_on != self.shared.fingerprint:
            raise ConfigError(f"{self.run}/run.json was trained on another base than {self.cfg.base} holds now "
                              f"(fingerprint {made_on[:12]} vs {self.shared.fingerprint[:12]}): its packs would not "
                              "fit; train a new run (--out) on this base")
        self.state = state
        if "method_config" in state:
            self.method_cfg = MethodConfig.from_dict(state["method_config"])

    def new_method(self):
        ctx = Context(self.shared.base, self.features, self.tasks, seed=self.cfg.seed)
        return build_method(self.cfg.method, ctx, self.method_cfg)

    def restore(self, upto: int):
        """The method as it was after task `upto` (structure replayed, state loaded)."""
        method = self.new_method()
        for t in range(upto + 1):
            method.begin_task(t, self.tasks[t])
            method.end_task(t, self.tasks[t])
        state = ck.load_state(self.run, upto, self.tasks[upto].task_id)
        if state:
            method.load_state_dict(state)
        return method

    def resume_state(self) -> int:
        """Load run.json of an interrupted run; return how many tasks are finished."""
        old = ck.read_run(self.run)
        want = {k: v for k, v in self.cfg.to_dict().items() if k not in RESUME_FREE}
        have = {k: v for k, v in old["config"].items() if k not in RESUME_FREE}
        if want != have:
            diff = sorted(k for k in want if want[k] != have.get(k))
            raise ConfigError(f"{self.run}/run.json was made with other settings ({', '.join(diff)}); "
                              "resume with the same options or start a new --out")
        self.adopt(old)
        self.state["status"] = "running"
        return len(old["rows"])

    def finish(self, rows: list[dict]) -> dict:
        self.state["rows"] = rows
        self.state["status"] = "done" if len(rows) == len(self.tasks) else "stopped"
        ck.write_json(self.run / ck.RUN_JSON, self.state)
        results = report.build_results(self.state, self.tasks)
        report.write_run_reports(self.run, results)
        return results


def write_predictions(session: Session, method) -> None:
    """RUN/predictions.json: the final model's answer and deciding task for every test sample
    (what a station with all packs installed must reproduce)."""
    out = {}
    for t, task in enumerate(session.tasks):
        refs = [(t, i) for i in range(len(task.test))]
        for s in range(0, len(refs), session.cfg.eval_batch_size):
            chunk = refs[s:s + session.cfg.eval_batch_size]
            pred = method.predict(session.features.batch(session.tasks, chunk, "test"))
            for (_, i), answer, sel in zip(chunk, pred.answers, pred.selected):
                out[f"{task.task_id}/{i}"] = {"answer": answer, "selected": session.tasks[sel].task_id}
    ck.write_json(session.run / "predictions.json", out)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def train_task(session: Session, method, t: int) -> dict:
    """Train task t's refs for cfg.epochs; return {"steps", "loss_first", "loss_last", "seconds"}."""
    cfg, dist = session.cfg, session.dist
    refs = method.training_refs(t)
    params = method.trainable_parameters(t)
    out = {"steps": 0, "loss_first": None, "loss_last": None, "seconds": 0.0, "samples": len(refs)}
    if not refs or not params:
        return out
    model, opt = dist.wrap(method, torch.optim.AdamW(method.param_groups(t, cfg.lr), weight_decay=0.0))
    order = method.generator(t, 5)
    start = time.perf_counter()
    batches = [(e, s) for e in range(cfg.epochs) for s in range(0, len(refs), cfg.batch_size)]
    perm = None
    for e, s in progress(batches, desc=f"{cfg.method} task {t}"):
        if s == 0:
            perm = torch.randperm(len(refs), generator=order).tolist()
        chunk = [refs[i] for i in perm[s:s + cfg.batch_size]]
        if not dist.usable(chunk):
            continue
        loss = model(session.features.batch(session.tasks, dist.shard(chunk), "train"))
        dist.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        out["loss_first"] = value if out["loss_first"] is None else out["loss_first"]
        out["loss_last"] = value
        out["steps"] += 1
    out["seconds"] = time.perf_counter() - start
    return out


def task_row(session: Session, method, t: int, trained: dict) -> dict:
    task = session.tasks[t]
    ev = evaluate_row(method, session.features, session.tasks, t, session.cfg.full_matrix,
                      session.cfg.eval_batch_size, desc=f"eval after {task.task_id}")
    pack = ck.pack_tensors(method.state_for_pack(task.task_id))
    counts = method.param_counts(t)
    return {"task_index": t, "task_id": task.task_id, "train_seconds": trained["seconds"],
            "steps": trained["steps"], "train_samples": trained["samples"], "loss_first": trained["loss_first"],
            "loss_last": trained["loss_last"], "params": counts, "trainable_params": int(sum(counts.values())),
            "pack_bytes": int(sum(a.nbytes for a in pack.values())), **ev}


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None,
          shared: Shared | None = None, on_task=None) -> dict | None:
    """Run (or resume) the whole stream; return results (None on a non-main process or when
    stopped early by `stop_after`, which simulates a crash after that task). `on_task(run_dir,
    t, task_id)` is called on the main process once task t's checkpoint and pack files exist
    (the demo exports and publishes the pack there)."""
    session = Session(cfg, shared)
    dist = session.dist
    if (session.run / ck.RUN_JSON).exists() and not resume:
        raise ConfigError(f"{session.run} already holds a run; pass --resume to continue it or choose another --out")
    done = session.resume_state() if resume and (session.run / ck.RUN_JSON).exists() else 0
    session.state["world_size"] = dist.world
    _seed_all(cfg.seed)
    method = session.restore(done - 1) if done else session.new_method()
    rows = list(session.state["rows"])
    for t in range(done, len(session.tasks)):
        task = session.tasks[t]
        method.begin_task(t, task)
        trained = train_task(session, method, t)
        method.end_task(t, task)
        if dist.is_main:
            rows.append(task_row(session, method, t, trained))
            text_emb = session.features.text_embeddings(list(task.train_instructions)).numpy()
            ck.save_task(session.run, t, task.task_id, method, rows[-1], extra={"text_emb": text_emb})
            write_pack_meta(session, method, t, rows[-1])
            if t == len(session.tasks) - 1:
                write_predictions(session, method)
            session.state["rows"] = rows
            ck.write_json(session.run / ck.RUN_JSON, session.state)
            if on_task is not None:
                on_task(session.run, t, task.task_id)
        dist.barrier()
        if stop_after is not None and t == stop_after:
            return None
    if not dist.is_main:
        return None
    return session.finish(rows)


def parse_options(pairs: list[str]) -> dict:
    """["top_k=3", "lora_targets=q_proj,v_proj"] -> typed dict (JSON values, comma lists)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--option {pair!r}: write NAME=VALUE (e.g. top_k=3)")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v.split(",") if "," in v or k == "lora_targets" else v
    return out


def add_train_args(ap: argparse.ArgumentParser) -> None:
    d = TrainConfig(base="-", out="-")
    ap.add_argument("--base", required=True, help="base folder (kaizen base init / pretrain, or a LLaVA checkpoint)")
    ap.add_argument("--clip", default="", help="CLIP folder (default: BASE/clip)")
    ap.add_argument("--stream", default=d.stream, help="built-in stream name (inspection|realdev) or a stream TOML")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--n-train", type=int, default=d.n_train, help="train samples per built-in task")
    ap.add_argument("--n-test", type=int, default=d.n_test, help="test samples per built-in task")
    ap.add_argument("--max-tasks", type=int, default=0, help="only the first N tasks of the stream")
    ap.add_argument("--seen-only", action="store_true", help="evaluate only tasks seen so far (no full matrix)")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="method option (MethodConfig field), e.g. top_k=3, lora_rank=4")


def config_from_args(a, method: str, out: str, seed: int | None = None) -> TrainConfig:
    return TrainConfig(base=a.base, clip=a.clip, out=out, method=method, stream=a.stream,
                       seed=a.seed if seed is None else seed, epochs=a.epochs, lr=a.lr,
                       batch_size=a.batch_size, n_train=a.n_train, n_test=a.n_test, max_tasks=a.max_tasks,
                       full_matrix=not a.seen_only, threads=a.threads, options=parse_options(a.option))


def cli_main(argv: list[str]) -> int:
    if any(a == "--continue" or a.startswith("--continue=") for a in argv):  # the improvement loop: its own options (continue_run.py)
        from .continue_run import cli_main as continue_main

        return continue_main(argv)
    ap = argparse.ArgumentParser(prog="kaizen train", description=__doc__.splitlines()[0])
    ap.add_argument("--continue", metavar="RUN", help="next version of one task's pack from added samples "
                    "(see kaizen train --continue RUN --help)")
    ap.add_argument("--method", default="kaizen", help=f"one of {', '.join(METHODS)}")
    ap.add_argument("--out", required=True, help="run folder to write")
    add_train_args(ap)
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # crash simulation (tests)
    a = ap.parse_args(argv)
    cfg = config_from_args(a, a.method, a.out)
    results = train(cfg, resume=a.resume, stop_after=a.stop_after)
    if a.stop_after is not None and results is None:
        print(f"stopped after task {a.stop_after} (as asked); resume with --resume")
        return 3
    if results is not None:
        print(report.summary_line(results) + f"  -> {a.out}/results.json")
    return 0
