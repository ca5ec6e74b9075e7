"""A base declares the method options measured best on it (kaizen_base.json "method_defaults";
the real presets: top_k 1 + prompt_net 16): a run on it gets them unless it passes its own, the
run records what it trained with (and a continue/resume keeps that), bad entries are refused
naming the file, and the presets' defaults are valid options."""

import json
import shutil

import pytest

from kaizen.runtime.errors import ConfigError
from kaizen.trainer.methods.base import MethodConfig, base_method_defaults
from kaizen.trainer.presets import REAL_PRESETS
from kaizen.trainer.train import Session, Shared, TrainConfig, train


@pytest.fixture(scope="module")
def declaring_base(tiny_llama, tmp_path_factory):
    """A copy of the tiny base whose kaizen_base.json declares method defaults."""
    base = tmp_path_factory.mktemp("md") / "base"
    shutil.copytree(tiny_llama[0], base)
    info = json.loads((base / "kaizen_base.json").read_text())
    info["method_defaults"] = {"top_k": 1, "prompt_net": 4}
    (base / "kaizen_base.json").write_text(json.dumps(info))
    return base


def _cfg(base, out, **options):
    return TrainConfig(base=str(base), out=str(out), n_train=6, n_test=3, max_tasks=2, epochs=1, batch_size=3,
                       options=options)


def test_a_run_gets_the_base_defaults_unless_it_passes_its_own(declaring_base, tmp_path):
    shared = Shared(str(declaring_base))
    m = Session(_cfg(declaring_base, tmp_path / "a"), shared).new_method()
    assert (m.cfg.top_k, m.cfg.prompt_net) == (1, 4)
    m = Session(_cfg(declaring_base, tmp_path / "b", top_k=2), shared).new_method()
    assert (m.cfg.top_k, m.cfg.prompt_net) == (2, 4)   # an explicit option wins, the rest stays
    train(_cfg(declaring_base, tmp_path / "run"), shared=shared)
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["config"]["options"] == {} and state["method_config"]["prompt_net"] == 4
    assert Session.from_run(tmp_path / "run", shared).method_cfg.prompt_net == 4   # continue/eval see it


def test_a_run_keeps_what_it_was_trained_with(declaring_base, tiny_llama, tmp_path):
    """run.json's method_config, not today's base file, decides for a continue or resume."""
    shared = Shared(str(tiny_llama[0]))   # this base declares nothing
    train(_cfg(tiny_llama[0], tmp_path / "run", prompt_net=3), shared=shared)
    state_path = tmp_path / "run" / "run.json"
    state = json.loads(state_path.read_text())
    state["method_config"]["prompt_net"] = 5
    state_path.write_text(json.dumps(state))
    assert Session.from_run(tmp_path / "run", shared).method_cfg.prompt_net == 5


@pytest.mark.parametrize("defaults, match", [
    ({"bogus": 1}, r"kaizen_base.json: \"method_defaults\" .*unknown method option"),
    ({"top_k": 0}, r"kaizen_base.json: \"method_defaults\" .*top_k must be >= 1"),
    ([1, 2], r"kaizen_base.json: \"method_defaults\" must be an object"),
])
def test_bad_method_defaults_are_refused_naming_the_file(defaults, match):
    with pytest.raises(ConfigError, match=match):
        base_method_defaults({"method_defaults": defaults}, "bases/x/kaizen_base.json")
    assert base_method_defaults({}) == {}


@pytest.mark.parametrize("name", sorted(REAL_PRESETS))
def test_real_presets_declare_valid_defaults(name):
    defaults = REAL_PRESETS[name].method_defaults
    cfg = MethodConfig.from_dict(defaults)
    assert (cfg.top_k, cfg.prompt_net) == (1, 16)


def test_an_assembled_real_base_declares_its_presets_defaults(real_fast):
    info = json.loads((real_fast[0] / "kaizen_base.json").read_text())
    assert info["method_defaults"] == REAL_PRESETS["real-fast"].method_defaults
