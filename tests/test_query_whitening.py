"""Query whitening of unaligned image queries (export/query_whitening.py): the fit whitens, the
file is checked by name, `kaizen base pretrain` fits it on generic images, the trainer's queries
and vision.onnx's `image_query` carry it, and it is part of the base fingerprint."""

import json
import shutil

import numpy as np
import pytest
import torch

from kaizen.export import query_whitening as QW
from kaizen.export.loading import base_fingerprint, load_base, load_query
from kaizen.export.parity import fixed_images
from kaizen.export.reference import tower_features, vision_pass
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import BundleError
from kaizen.runtime.preprocess import preprocess_batch


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_fit_whitens_anisotropic_queries():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 8)) * np.array([10, 5, 3, 1, 1, 0.5, 0.2, 0.1]) + 20.0 * np.eye(8)[0]
    mean, matrix = QW.fit(x, eps=1e-6)
    assert mean.dtype == matrix.dtype == np.float32 and matrix.shape == (8, 8)
    white = (_unit(x) - mean) @ matrix
    np.testing.assert_allclose(np.cov(white.T), np.eye(8), atol=1e-2)
    raw = np.cov(_unit(x).T)
    assert raw.diagonal().max() / raw.diagonal().min() > 100  # what it started from
    _, ridged = QW.fit(x)  # the default ridge keeps the weakest directions from blowing up
    assert np.abs(ridged).max() < np.abs(matrix).max()


@pytest.mark.parametrize("arrays, match", [
    ({"mean": np.zeros(4, np.float32)}, r"must hold float32 `mean` \[4\] and `matrix` \[4, 4\]"),
    ({"mean": np.zeros(4, np.float32), "matrix": np.eye(3, dtype=np.float32)}, r"\[4, 4\]"),
    ({"mean": np.zeros(4), "matrix": np.eye(4)}, r"float32"),
    ({"mean": np.full(4, np.nan, np.float32), "matrix": np.eye(4, dtype=np.float32)}, r"finite"),
])
def test_a_bad_whitening_file_is_refused_by_name(tmp_path, arrays, match):
    assert QW.load(tmp_path, 4) is None  # no file: no whitening
    np.savez(tmp_path / QW.FILE, **arrays)
    with pytest.raises(BundleError, match=rf"{QW.FILE} {match}|{match}.*{QW.FILE}|{QW.FILE}.*{match}"):
        QW.load(tmp_path, 4)


def test_garbage_whitening_file_is_refused(tmp_path):
    (tmp_path / QW.FILE).write_bytes(b"not an npz")
    with pytest.raises(BundleError, match=rf"{QW.FILE} is not a readable .npz.*kaizen base pretrain"):
        QW.load(tmp_path, 4)


def test_real_base_queries_are_whitened_in_torch_and_onnx(real_fast):
    """The aligned real-fast base carries its whitening (fitted by `kaizen base pretrain`); the
    trainer's image query and the bundle's `image_query` both apply it."""
    base_dir, bundle_dir = real_fast
    info = json.loads((base_dir / "kaizen_base.json").read_text())
    assert info["query"]["whitening"]["file"] == QW.FILE and (base_dir / QW.FILE).exists()
    base = load_base(base_dir)
    mean, matrix = QW.attached(base.model)
    images = fixed_images(base.preprocess.size)
    px = torch.from_numpy(preprocess_batch(images, base.preprocess))
    with torch.no_grad():
        _, pooled = tower_features(base.model, px)
        _, query = vision_pass(base.model, px)
    want = (_unit(pooled.numpy()) - mean.numpy()) @ matrix.numpy()
    np.testing.assert_allclose(query.numpy(), want, atol=1e-4)
    station = Engine(Bundle.open(bundle_dir, providers=["CPUExecutionProvider"])).vision_pass(images)[1]
    np.testing.assert_allclose(station, _unit(want), atol=1e-4)
    assert np.abs(station - _unit(pooled.numpy())).max() > 0.05  # not the raw CLS


def test_whitening_is_part_of_the_base_fingerprint(real_fast, tmp_path):
    """Re-fitting (`kaizen base pretrain --whiten-only`) or removing it makes another base: packs
    made before are refused as "wrong base"."""
    from kaizen.trainer.align import whiten

    base_dir = tmp_path / "base"
    shutil.copytree(real_fast[0], base_dir)
    base = load_base(base_dir)
    before = base_fingerprint(base, load_query(base))
    whiten(base_dir, n_images=12, seed=3, log=lambda *_: None)
    refit = load_base(base_dir)
    assert base_fingerprint(refit, load_query(refit)) != before
    (base_dir / QW.FILE).unlink()
    with pytest.raises(BundleError, match=rf"{QW.FILE} is missing but .*kaizen_base.json says"):
        load_base(base_dir)
    info = json.loads((base_dir / "kaizen_base.json").read_text())
    del info["query"]["whitening"]
    (base_dir / "kaizen_base.json").write_text(json.dumps(info))
    plain = load_base(base_dir)
    assert QW.attached(plain.model) is None
    assert base_fingerprint(plain, load_query(plain)) != before
