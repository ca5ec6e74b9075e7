"""The real-fast base's fixed output head (README "A fixed output head"): stage 1 leaves the tiny
LM's head as assembled, and a pack's LoRA then learns answer words stage 1 never produced. The
control shows why: the same stage 1 with the head trained from a small init leaves the LoRA stuck
near a uniform guess over the unused tokens (~5.5 nats per token where the fixed head reaches < 2)."""

import json

import numpy as np
import pytest
import torch

from kaizen.export.lora_targets import ALL_TARGETS
from kaizen.export.reference import image_features
from kaizen.runtime.preprocess import preprocess_batch
from kaizen.trainer.align import align
from kaizen.trainer.assemble import assemble
from kaizen.trainer.bases import load_base
from kaizen.trainer.methods import lm
from kaizen.trainer.methods.lora import LoraAdapter, activated, ensure_slots
from kaizen.trainer.presets import RealPreset

NEW_WORDS = ["vehicle", "animal", "plant", "food"]  # none is a generic (stage-1) answer


def _aligned_base(root, parts, fixed: bool):
    base_dir = root / ("fixed" if fixed else "trained")
    assemble("real-fast", base_dir, cache=parts, log=lambda *_: None)
    head = load_base(base_dir).model.lm_head.weight.detach().clone()
    if not fixed:  # the recipe before the fixed head: the LM's own init (std 0.02), trained in stage 1
        info_path = base_dir / "kaizen_base.json"
        info = json.loads(info_path.read_text())
        info["preset"]["fixed_head"] = False
        info_path.write_text(json.dumps(info))
        base = load_base(base_dir)
        with torch.no_grad():
            base.model.lm_head.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
        base.model.save_pretrained(str(base_dir))
        head = base.model.lm_head.weight.detach().clone()
    report = align(base_dir, steps=40, batch=4, n_images=8, log=lambda *_: None)
    assert report["fixed_head"] is fixed
    return load_base(base_dir), head


def _new_word_loss(base, steps: int = 60) -> float:
    """Answer CE after a rank-8 LoRA (all 7 targets) learned 8 parts answered with NEW_WORDS."""
    torch.manual_seed(0)
    slots = ensure_slots(base, ALL_TARGETS)
    adapter = LoraAdapter(slots, 8, 2.0, torch.Generator().manual_seed(0))
    pixels = list(np.random.default_rng(0).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8))
    with torch.no_grad():
        feats = image_features(base.model, torch.from_numpy(preprocess_batch(pixels, base.preprocess)))
    answers, no_prompt = NEW_WORDS * 2, [torch.zeros(0, feats.shape[-1])] * 8
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    for _ in range(steps):
        with activated(slots, [adapter]):
            loss = lm.answer_loss(base, feats, ["What kind of object is this?"] * 8, no_prompt, answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-head", "control-trained-head"])
def test_a_pack_learns_answer_words_stage_1_never_produced(real_fast, tiny_root, tmp_path, fixed):
    torch.set_num_threads(1)
    base, head_before = _aligned_base(tmp_path, tiny_root / "parts", fixed)
    head = base.model.lm_head.weight.detach()
    if fixed:
        assert torch.equal(head, head_before), "stage 1 changed the fixed output head"
        assert abs(float(head.std()) * head.shape[1] ** 0.5 - 1.0) < 0.05  # N(0, 1/d) as assembled
        assert _new_word_loss(base) < 2.5
    else:
        assert not torch.equal(head, head_before)
        assert _new_word_loss(base) > 4.0


def test_fixed_head_only_for_the_tiny_lm_trained_in_stage_1():
    with pytest.raises(ValueError, match="fixed_head"):
        RealPreset(name="x", lm="smollm2-135m", image_size=112, fixed_head=True)
    with pytest.raises(ValueError, match="fixed_head"):
        RealPreset(name="x", lm="tiny", image_size=112, train_lm=False, fixed_head=True)
