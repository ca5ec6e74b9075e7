"""Drifted variants of the built-in tasks (trainer/data/drift.py): deterministic, really drifted,
same answers and phrasings as the original task, and the built-in stream left byte-identical."""

import hashlib
import json

import numpy as np
import pytest

from kaizen.runtime.errors import ConfigError
from kaizen.trainer.data.added import read_added
from kaizen.trainer.data.drift import drifted_task, write_llava_json
from kaizen.trainer.data.synthetic import inspection_stream, make_task

# sha256 over the images, instructions and answers of inspection_stream(0, n_train=3, n_test=2),
# measured before drift.py existed: drift must not change the built-in stream.
BUILTIN_SHA = "37a30c72de45ee8c64fff0c3c7613acbd43bf0b40e7798e65abda656a561407e"


def test_builtin_stream_is_byte_identical():
    h = hashlib.sha256()
    for t in inspection_stream(0, n_train=3, n_test=2):
        for s in t.train + t.test:
            h.update(s.image.tobytes())
            h.update(s.instruction.encode())
            h.update(s.answer.encode())
    assert h.hexdigest() == BUILTIN_SHA


@pytest.mark.parametrize("task_id,kind", [("seal_defect", "supplier"), ("plate_defect", "supplier"),
                                          ("hole_count", "supplier"), ("cable_color", "lighting"),
                                          ("part_type", "lighting")])
def test_drifted_task_is_deterministic_and_keeps_answers_and_phrasings(task_id, kind):
    a, b = drifted_task(task_id, kind, 0, 8, 4), drifted_task(task_id, kind, 0, 8, 4)
    orig = make_task(task_id, 0, 8, 4)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.train + a.test, b.train + b.test))
    assert not np.array_equal(drifted_task(task_id, kind, 1, 8, 4).train[0].image, a.train[0].image)
    assert a.answers == orig.answers and a.train_instructions == orig.train_instructions
    assert a.test_instructions == orig.test_instructions
    assert sorted(s.answer for s in a.train) == sorted(s.answer for s in orig.train)  # balanced alike
    assert {s.instruction for s in a.test} <= set(orig.test_instructions)
    assert all(s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8 for s in a.train)


def test_drift_really_changes_the_look():
    orig = make_task("seal_defect", 0, 16, 1).train
    light = drifted_task("seal_defect", "lighting", 0, 16, 1).train
    supplier = drifted_task("seal_defect", "supplier", 0, 16, 1).train
    mean = lambda samples: np.mean([s.image.reshape(-1, 3).mean(0) for s in samples], axis=0)
    assert mean(light).sum() < 0.6 * mean(orig).sum()  # dim
    assert mean(light)[0] > 1.8 * mean(light)[2]  # warm cast: red over blue
    blue_share = lambda samples: np.mean([(s.image[..., 2].astype(int) - s.image[..., 0] > 80).mean()
                                          for s in samples])
    assert blue_share(supplier) > 0.05 > blue_share(orig)  # blue silicone rings


def test_unknown_drift_is_refused():
    with pytest.raises(ConfigError, match="'supplier' exists for"):
        drifted_task("cable_color", "supplier")
    with pytest.raises(ConfigError, match="drift kind 'fog'"):
        drifted_task("seal_defect", "fog")
    with pytest.raises(ConfigError, match="unknown built-in synthetic task"):
        drifted_task("gasket", "lighting")


def test_written_llava_json_reads_back_with_unlabelled_skipped(tmp_path):
    task = drifted_task("hole_count", "supplier", 0, 6, 1)
    path = write_llava_json(task.train, tmp_path, unlabelled=2)
    records = json.loads(path.read_text())
    assert len(records) == 6 and all("kaizen" in r for r in records)
    got, skipped = read_added(path, "hole_count")
    assert skipped == 2 and [s.answer for _, s in got] == [s.answer for s in task.train[:4]]
    assert np.array_equal(got[0][1].load_image(), task.train[0].image)  # PNG round trip is lossless
