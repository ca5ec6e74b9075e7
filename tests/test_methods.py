"""Contract of every registered continual method on the tiny base (random init, 2-task stream).

Each method runs a couple of steps per task; checks: finite loss, trainable parameters (none
for zeroshot), state_for_pack shapes/dtypes in the exported decoder's LoRA format, answers in
the closed answer set, the last task's prompt trains, keys are plain vectors, O-LoRA's
orthogonality term, the replay buffer, LoRA summing, and the decoding rule.
"""

import numpy as np
import pytest
import torch

from kaizen.export.loading import load_base
from kaizen.export.wrappers import DEFAULT_TARGETS, add_lora_slots
from kaizen.trainer.bases import init_base, load_clip
from kaizen.trainer.data.stream import builtin_stream
from kaizen.trainer.features import FeatureCache
from kaizen.trainer.methods import METHODS, Context, MethodConfig, build_method, lm
from kaizen.trainer.methods.lora import LoraAdapter, activated, ensure_slots

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = init_base("tiny-llama", tmp_path_factory.mktemp("base") / "b", seed=0)
    base, clip = load_base(d), load_clip(d / "clip")
    tasks = builtin_stream("inspection", seed=0, n_train=8, n_test=4)[:2]
    feats = FeatureCache(base, clip)
    return {"dir": d, "base": base, "clip": clip, "tasks": tasks, "features": feats}


def run_method(env, name, steps=2, cfg=None, lr=1e-2):
    tasks, fc = env["tasks"], env["features"]
    m = build_method(name, Context(env["base"], fc, tasks, seed=0), cfg or MethodConfig(top_k=2))
    losses, snapshots = [], []
    for t, task in enumerate(tasks):
        m.begin_task(t, task)
        refs, params = m.training_refs(t), m.trainable_parameters(t)
        snapshots.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        if refs and params:
            opt = torch.optim.AdamW(m.param_groups(t, lr))
            for s in range(steps):
                loss = m.training_step(fc.batch(tasks, refs[s * 4:(s + 1) * 4]))
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(float(loss.detach()))
        m.end_task(t, task)
    return m, losses, snapshots


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_honours_the_contract(env, name):
    m, losses, _ = run_method(env, name)
    tasks, base = env["tasks"], env["base"]
    d_model = base.model.config.text_config.hidden_size
    d_clip = env["clip"].model.config.projection_dim
    if name == "zeroshot":
        assert m.trainable_parameters(1) == [] and m.training_refs(1) == []
        assert np.isfinite(float(m.training_step(env["features"].batch(tasks, [(0, 0)]))))
    else:
        assert losses and all(np.isfinite(losses)), losses
        assert sum(m.param_counts(len(tasks) - 1).values()) > 0
    shapes = dict(add_lora_slots(load_base(env["dir"]).model.model.language_model, DEFAULT_TARGETS, 8))
    for task in tasks:
        pack = m.state_for_pack(task.task_id)
        assert set(pack) == {"prompt", "key", "lora", "prompt_net"} and pack["prompt_net"] is None
        if m.uses_selection:
            assert pack["prompt"].shape == (10, d_model) and pack["prompt"].dtype == np.float32
            assert pack["key"].shape == (d_clip,) and pack["key"].dtype == np.float32
            assert abs(np.linalg.norm(pack["key"]) - 1) < 1e-5
        else:
            assert pack["prompt"] is None and pack["key"] is None
        if pack["lora"] is not None:
            assert set(pack["lora"]) == set(shapes)  # exactly the decoder's LoRA input names
            for k, arr in pack["lora"].items():
                assert arr.dtype == np.float32
                fixed = 1 if k.endswith(".A") else 0
                assert arr.shape[fixed] == shapes[k][fixed], (k, arr.shape, shapes[k])
    assert (pack["lora"] is None) == (name in ("modalprompt", "zeroshot"))
    batch = env["features"].batch(tasks, [(i, j) for i in range(2) for j in range(4)], "test")
    pred = m.predict(batch)
    assert len(pred.answers) == len(batch)
    for a, sel in zip(pred.answers, pred.selected):
        assert a in tasks[sel].answers  # closed answer set of the selected (or true) task


@pytest.mark.parametrize("name", ["modalprompt", "kaizen"])
def test_last_task_prompt_trains_and_earlier_prompts_stay(env, name):
    m, _, snaps = run_method(env, name)
    before_last = snaps[-1]
    assert not torch.equal(m.prompts[1].detach(), before_last["prompts.1"])  # the last task's prompt moved
    assert torch.equal(m.prompts[0].detach(), before_last["prompts.0"])  # earlier prompt frozen
    assert torch.equal(m.keys[0].detach(), before_last["keys.0"])


def test_key_is_a_plain_vector(env):
    m, _, _ = run_method(env, "kaizen", steps=1)
    d_clip = env["clip"].model.config.projection_dim
    counts = m.param_counts(1)
    assert counts["key"] == d_clip and counts["prompt"] == 10 * env["base"].model.config.text_config.hidden_size
    assert all(k.shape == (d_clip,) for k in m.keys)


def test_olora_orthogonality_and_frozen_previous(env):
    m, _, snaps = run_method(env, "olora")
    assert float(m.orthogonality(1)) > 0
    for k, v in snaps[1].items():  # adapter 0 did not change while task 1 trained
        if k.startswith("adapters.0."):
            assert torch.equal(m.state_dict()[k], v)
    pack1 = m.state_for_pack(env["tasks"][1].task_id)["lora"]
    assert pack1["lora.0.q_proj.A"].shape[0] == 2 * 8  # sum of 2 adapters as one set


def test_replay_buffer_is_filled_and_checkpointed(env):
    m, _, _ = run_method(env, "replay", cfg=MethodConfig(replay_size=5))
    assert len(m.buffer) == 5 and {t for t, _ in m.buffer} <= {0, 1}
    sd = m.state_dict()
    fresh = build_method("replay", m.ctx, m.cfg)
    for t, task in enumerate(env["tasks"]):
        fresh.begin_task(t, task)
    fresh.load_state_dict(sd)
    assert fresh.buffer == m.buffer and fresh.n_seen == m.n_seen == 16


def test_lora_sum_equals_concatenation(env):
    slots = ensure_slots(env["base"], DEFAULT_TARGETS)
    g = torch.Generator().manual_seed(0)
    a1, a2 = LoraAdapter(slots, 4, 2.0, g), LoraAdapter(slots, 4, 2.0, g)
    for a in (a1, a2):
        for b in a.B:
            b.data.normal_(generator=g)
    x = torch.randn(3, slots.modules[0].base.in_features)
    outs = []
    for ads in ([a1], [a2], [a1, a2], None):
        with activated(slots, ads):
            outs.append(slots.modules[0](x))
    assert torch.allclose(outs[2] - outs[3], (outs[0] - outs[3]) + (outs[1] - outs[3]), atol=1e-5)
    assert slots.modules[0].A is None  # deactivated after the block


def test_decoding_rule_closed_set_scores_open_set_generates(env, monkeypatch):
    m, _, _ = run_method(env, "lora_ft", steps=1)
    tasks, fc = env["tasks"], env["features"]
    batch = fc.batch(tasks, [(0, 0), (0, 1)], "test")
    calls = []
    monkeypatch.setattr(lm, "greedy", lambda *a, **k: calls.append("greedy") or ["free text"] * len(a[2]))
    closed = m.predict(batch).answers
    assert calls == [] and all(a in tasks[0].answers for a in closed)
    # the pick is the candidate with the highest summed log-prob of " answer" + EOS
    with activated(m.slots, m.adapters_for(0)):
        lp = [lm.answer_logprobs(env["base"], batch.image, batch.instructions, None, [c] * 2)
              for c in tasks[0].answers]
    best = torch.stack(lp).argmax(0).tolist()
    assert closed == [tasks[0].answers[b] for b in best]
    saved = tasks[0].answers
    try:
        tasks[0].answers = None  # a free-form task: greedy decoding
        assert m.predict(batch).answers == ["free text"] * 2 and calls == ["greedy"]
    finally:
        tasks[0].answers = saved


def test_greedy_decodes_text(env):
    base, fc = env["base"], env["features"]
    batch = fc.batch(env["tasks"], [(0, 0), (1, 0)], "test")
    out = lm.greedy(base, batch.image, batch.instructions, None, max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_kaizen_with_image_conditioned_prompts(env):
    cfg = MethodConfig(top_k=2, prompt_net=4)
    m, losses, snaps = run_method(env, "kaizen", cfg=cfg)
    d_model = env["base"].model.config.text_config.hidden_size
    d_clip = env["clip"].model.config.projection_dim
    assert all(np.isfinite(losses))
    net = m.state_for_pack(env["tasks"][1].task_id)["prompt_net"]
    assert net["W1"].shape == (4, d_clip) and net["W2"].shape == (10 * d_model, 4)
    assert m.param_counts(1)["prompt_net"] == 4 * d_clip + 10 * d_model * 4
    assert not torch.equal(m.nets[1].W2.detach(), snaps[-1]["nets.1.W2"])  # the last task's net trained
    assert torch.equal(m.nets[0].W2.detach(), snaps[-1]["nets.0.W2"])  # the earlier one stayed
    batch = env["features"].batch(env["tasks"], [(1, 0), (1, 1)], "test")
    route = m.route(batch)
    assert route.prompts[0].shape == (20, d_model)  # top 2 conditioned prompts, fused
    assert not torch.equal(route.prompts[0], route.prompts[1])  # each part its own prompt


def test_golden_answers_use_the_image_conditioned_prompt(env, monkeypatch):
    """The golden answers a pack ships are computed as the station computes them: with the pack's
    prompt conditioned on each golden image (a static prompt made stations refuse good packs)."""
    from types import SimpleNamespace

    from kaizen.trainer import pack_meta

    m, _, _ = run_method(env, "kaizen", cfg=MethodConfig(top_k=1, prompt_net=4))
    with torch.no_grad():
        m.nets[1].W2.copy_(torch.randn(m.nets[1].W2.shape, generator=torch.Generator().manual_seed(0)))
    seen = []
    real = lm.score_candidates
    monkeypatch.setattr(pack_meta.lm, "score_candidates", lambda *a: seen.append(a[3]) or real(*a))
    refs = [(1, i) for i in range(4)]
    got = pack_meta.pack_alone_answers(m, SimpleNamespace(features=env["features"], tasks=env["tasks"]), 1, refs)
    assert len(got) == 4 and all(a in env["tasks"][1].answers for a in got)
    want = m.prompt_for(1, env["features"].batch(env["tasks"], refs, "test").clip_img)
    assert len(seen) == 1 and all(torch.equal(p, w) for p, w in zip(seen[0], want))
    assert not torch.equal(want[0], want[1])  # each golden image its own prompt
