"""The trainer's torch selection equals the station's numpy selection (kaizen.runtime.selection).

Same keys + queries -> same scores (within 1e-6) and the same top-k order; equal scores go to
the lower index on both sides; and a trained method's own routing equals numpy selection over
the keys its packs carry. (Two keys whose scores differ by less than float32 rounding, ~1e-7,
may order differently: BLAS does not give identical key rows bit-identical scores, in numpy or
in torch, so exact duplicates are tested on equal score arrays instead.)
"""

import numpy as np
import pytest
import torch

from kaizen.runtime import selection as np_sel
from kaizen.trainer.methods.modalprompt import torch_scores, torch_top_k


@pytest.mark.parametrize("seed", range(5))
def test_scores_and_top_k_match_numpy(seed):
    rng = np.random.default_rng(seed)
    d, t, b = 64, 7, 33
    keys = rng.standard_normal((t, d)).astype(np.float32) * rng.uniform(0.1, 5)
    q_img = rng.standard_normal((b, d)).astype(np.float32)
    q_txt = rng.standard_normal((b, d)).astype(np.float32) * 3
    ref = np_sel.scores(q_img, q_txt, keys)
    got = torch_scores(torch.from_numpy(q_img), torch.from_numpy(q_txt), torch.from_numpy(keys)).numpy()
    assert np.abs(ref - got).max() < 1e-6
    for k in (1, 3, t, t + 2):
        assert np.array_equal(np_sel.top_k(ref, k), torch_top_k(torch.from_numpy(ref), k).numpy())
        assert np.array_equal(np_sel.select(q_img, q_txt, keys, k=k).indices,
                              torch_top_k(torch.from_numpy(got), k).numpy())


def test_ties_go_to_the_lower_index():
    s = torch.tensor([[0.5, 0.9, 0.9, 0.1]])
    assert torch_top_k(s, 3).tolist() == [[1, 2, 0]]
    assert np_sel.top_k(s.numpy(), 3).tolist() == [[1, 2, 0]]


def test_method_routing_equals_numpy_selection_on_pack_keys(tmp_path):
    from kaizen.export.loading import load_base
    from kaizen.trainer.bases import init_base, load_clip
    from kaizen.trainer.data.stream import builtin_stream
    from kaizen.trainer.features import FeatureCache
    from kaizen.trainer.methods import Context, MethodConfig, build_method

    d = init_base("tiny-llama", tmp_path / "b", seed=1)
    base, clip = load_base(d), load_clip(d / "clip")
    tasks = builtin_stream("inspection", seed=0, n_train=4, n_test=6)[:3]
    fc = FeatureCache(base, clip)
    m = build_method("kaizen", Context(base, fc, tasks, seed=0), MethodConfig(top_k=2))
    for t, task in enumerate(tasks):
        m.begin_task(t, task)
        with torch.no_grad():  # give keys distinct, non-prototype values
            m.keys[t].add_(torch.randn(m.keys[t].shape, generator=torch.Generator().manual_seed(t)) * 0.3)
        m.end_task(t, task)
    batch = fc.batch(tasks, [(i, j) for i in range(3) for j in range(6)], "test")
    route = m.route(batch)
    keys = np.stack([m.state_for_pack(t.task_id)["key"] for t in tasks])
    ref = np_sel.select(batch.clip_img.numpy(), batch.clip_txt.numpy(), keys, k=2)
    assert route.selected == ref.indices[:, 0].tolist()
    assert np.abs(route.scores.numpy() - ref.scores).max() < 1e-6
    for b, row in enumerate(ref.indices):  # prompts concatenated best first, as the station does
        want = torch.cat([m.prompts[j] for j in row])
        assert torch.equal(route.prompts[b], want)
