"""Shared fixtures. Everything offline, CPU, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
from pathlib import Path

import pytest

_BASES: dict = {}


def build_tiny(preset: str, root: Path) -> tuple[Path, Path]:
    """Random-init tiny base + its exported fp32 bundle (parity-checked), built once per session."""
    from kaizen.export.base_export import export_bundle
    from kaizen.trainer.bases import init_base

    base_dir, bundle_dir = root / preset / "base", root / preset / "bundle"
    init_base(preset, base_dir, seed=0)
    export_bundle(base_dir, bundle_dir, log=lambda *_: None)
    return base_dir, bundle_dir


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root) -> tuple[Path, Path]:
    """(base_dir, bundle_dir) of tiny-llama."""
    if "tiny-llama" not in _BASES:
        _BASES["tiny-llama"] = build_tiny("tiny-llama", tiny_root)
    return _BASES["tiny-llama"]


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_root) -> tuple[Path, Path]:
    if "tiny-qwen2" not in _BASES:
        _BASES["tiny-qwen2"] = build_tiny("tiny-qwen2", tiny_root)
    return _BASES["tiny-qwen2"]


@pytest.fixture
def bundle_copy(tiny_llama, tmp_path) -> Path:
    """A private copy of the tiny-llama bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_llama[1], dst)
    return dst
