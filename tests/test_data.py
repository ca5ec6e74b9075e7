"""Task-stream data: types, readers and their errors, TOML streams, the synthetic inspection
stream (determinism, balance, phrasings, shared pairs, visual variety) and generic data.

    .venv/bin/python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kaizen.runtime.errors import ConfigError, InputError
from kaizen.trainer.data import generic, synthetic
from kaizen.trainer.data.imagefolder import imagefolder_answers, read_imagefolder
from kaizen.trainer.data.llava_json import read_llava_json
from kaizen.trainer.data.stream import builtin_stream, load_stream, resolve_stream
from kaizen.trainer.data.types import DataError, Sample, Task, normalize_answer

N_TRAIN, N_TEST = 12, 6


@pytest.fixture(scope="module")
def stream() -> list[Task]:
    return synthetic.inspection_stream(seed=0, n_train=N_TRAIN, n_test=N_TEST)


def words(text: str) -> set[str]:
    return set(normalize_answer(text).split())


def contains_sentence(text: str, sentence: str) -> bool:
    """True if normalised `text` contains normalised `sentence` as whole words (or equals it)."""
    return f" {normalize_answer(sentence)} " in f" {normalize_answer(text)} "


# --------------------------------------------------------------------------- types


def test_normalize_answer():
    assert normalize_answer("  Upside-Down. ") == "upside down"
    assert normalize_answer("3!") == "3"
    assert normalize_answer("YES") == normalize_answer("yes,") == "yes"
    assert normalize_answer("Red\t cable") == "red cable"


def test_sample_load_image_from_array_and_path(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    assert Sample(arr, "q", "a", "t", "src").load_image() is arr
    Image.fromarray(arr[..., 0], "L").save(tmp_path / "grey.png")
    pixels = Sample(tmp_path / "grey.png", "q", "a", "t", "src").load_image()
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 10, 3)  # converted to RGB


def test_sample_load_image_errors_name_file_and_record(tmp_path):
    with pytest.raises(InputError, match=r"train\.json#7.*nope\.png.*does not exist"):
        Sample(tmp_path / "nope.png", "q", "a", "t", "train.json#7").load_image()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"train\.json#8.*bad\.png.*not a readable image"):
        Sample(tmp_path / "bad.png", "q", "a", "t", "train.json#8").load_image()
    with pytest.raises(InputError, match=r"rec-9.*uint8 \[H, W, 3\]"):
        Sample(np.zeros((4, 4), np.uint8), "q", "a", "t", "rec-9").load_image()


def test_task_validation_names_the_task():
    s = Sample(np.zeros((4, 4, 3), np.uint8), "Is it ok?", "yes", "seal", "x#0")
    with pytest.raises(DataError, match=r"task 'seal': the train split is empty"):
        Task("seal", [], [s])
    with pytest.raises(DataError, match=r"task 'seal': the test split is empty"):
        Task("seal", [s], [])
    with pytest.raises(DataError, match=r"x#0: answer 'yes' is not in task 'seal'"):
        Task("seal", [s], [s], answers=["ok", "torn"])
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        Task("seal", [s], [s], metric="bleu")
    task = Task("seal", [s], [s], answers=["Yes", "No"])
    assert task.train_instructions == ["Is it ok?"] and task.test_instructions == ["Is it ok?"]
    with pytest.raises(DataError, match="x#1: empty answer"):
        Sample(np.zeros((4, 4, 3), np.uint8), "q", " ", "seal", "x#1")


# --------------------------------------------------------------------------- LLaVA JSON


def write_png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)


def record(rid, image, question="<image>\nIs the seal torn?", answer="yes"):
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": conv}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_llava_reader_reads_records_and_takes_first_exchange(tmp_path):
    write_png(tmp_path / "img" / "a.png")
    write_png(tmp_path / "img" / "b.png", 200)
    multi = record("r2", "b.png", "Is it torn?\n<image>", "no")
    multi["conversations"] += [{"from": "human", "value": "And now?"}, {"from": "gpt", "value": "yes"}]
    path = write_json(tmp_path / "train.json", [record("r1", "a.png"), multi])
    samples = read_llava_json(path, tmp_path / "img", task_id="seal")
    assert [(s.instruction, s.answer, s.task_id) for s in samples] == [
        ("Is the seal torn?", "yes", "seal"), ("Is it torn?", "no", "seal")]
    assert samples[1].load_image()[0, 0, 0] == 200
    assert "r2" in samples[1].source and "train.json" in samples[1].source


@pytest.mark.parametrize("data, pattern", [
    ({"id": "x"}, r"expected a JSON list of records"),
    ([], r"has no records"),
    ([record("r1", "missing.png")], r"record #0 \(id 'r1'\).*missing\.png.*does not exist"),
    ([record("r1", "a.png"), record("r2", "bad.png")], r"record #1 \(id 'r2'\).*bad\.png.*not a readable image"),
    ([{"id": "r3", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq?"}]}],
     r"record #0 \(id 'r3'\): no gpt answer"),
    ([{"id": "r4", "image": "a.png", "conversations": [{"from": "gpt", "value": "yes"}]}],
     r"record #0 \(id 'r4'\): no human turn"),
    ([record("r1", "a.png"), {"image": "a.png", "conversations": []}], r"record #1: no human turn"),
    ([{"id": "r5", "conversations": []}], r"record #0 \(id 'r5'\): missing 'image'"),
    ([record("r6", "a.png", question="<image>")], r"record #0 \(id 'r6'\).*no text besides <image>"),
    (["just a string"], r"record #0: a record must be a JSON object"),
])
def test_llava_reader_errors_name_file_and_record(tmp_path, data, pattern):
    write_png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    path = write_json(tmp_path / "task.json", data)
    with pytest.raises(DataError, match=pattern) as info:
        read_llava_json(path, tmp_path)
    assert str(path) in str(info.value)


def test_llava_reader_invalid_json_and_missing_file(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        read_llava_json(tmp_path / "broken.json")
    with pytest.raises(DataError, match=r"absent\.json: LLaVA JSON file not found"):
        read_llava_json(tmp_path / "absent.json")


# --------------------------------------------------------------------------- ImageFolder


def make_imagefolder(root: Path, labels: dict[str, int]) -> Path:
    for label, n in labels.items():
        for k in range(n):
            write_png(root / label / f"{k}.png", 10 * k)
    return root


def test_imagefolder_answers_instructions_and_mapping(tmp_path):
    root = make_imagefolder(tmp_path / "train", {"bolt": 3, "nut": 3})
    phr = ["What part is this?", "Name the part."]
    samples = read_imagefolder(root, phr, task_id="part")
    assert Counter(s.answer for s in samples) == {"bolt": 3, "nut": 3}
    assert Counter(s.instruction for s in samples) == {phr[0]: 3, phr[1]: 3}
    assert imagefolder_answers(root) == ["bolt", "nut"]
    mapped = read_imagefolder(root, phr, answer_map={"bolt": "screw", "nut": "nut"})
    assert {s.answer for s in mapped} == {"screw", "nut"}
    assert all(s.load_image().shape == (16, 16, 3) for s in samples)
    assert [s.source for s in samples] == [s.source for s in read_imagefolder(root, phr)]  # seeded


def test_imagefolder_errors_name_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "r", {"ok": 1, "torn": 1})
    (root / "ok" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: not an image file"):
        read_imagefolder(root, ["q?"])
    (root / "ok" / "notes.txt").unlink()
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"label folder 'empty' has no images"):
        read_imagefolder(root, ["q?"])
    (root / "empty").rmdir()
    with pytest.raises(DataError, match=r"'torn' is missing from the answer mapping"):
        read_imagefolder(root, ["q?"], answer_map={"ok": "no"})
    (root / "torn" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"torn/0\.png.*not a readable image"):
        read_imagefolder(root, ["q?"])
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match=r"flat: no label folders"):
        read_imagefolder(tmp_path / "flat", ["q?"])
    with pytest.raises(DataError, match=r"absent: ImageFolder root does not exist"):
        read_imagefolder(tmp_path / "absent", ["q?"])


# --------------------------------------------------------------------------- TOML streams


def build_stream_dir(tmp_path: Path) -> Path:
    write_png(tmp_path / "seal" / "images" / "a.png")
    write_png(tmp_path / "seal" / "images" / "b.png", 30)
    write_json(tmp_path / "seal" / "train.json", [record("t1", "a.png"), record("t2", "b.png", answer="no")])
    write_json(tmp_path / "seal" / "test.json", [record("e1", "b.png", "<image>\nIs the ring torn?", "no")])
    make_imagefolder(tmp_path / "parts" / "train", {"bolt": 2, "nut": 2})
    make_imagefolder(tmp_path / "parts" / "test", {"bolt": 1, "nut": 1})
    (tmp_path / "line.toml").write_text('''
[stream]
seed = 3

[[task]]
id = "seal"
format = "llava"
train = "seal/train.json"
test = "seal/test.json"
images = "seal/images"
answers = ["yes", "no"]
domain = "rubber seal ring"

[[task]]
id = "part"
format = "imagefolder"
train = "parts/train"
test = "parts/test"
instructions = ["What part is this?", "Name the part."]
test_instructions = ["Which part do you see?"]
answer_map = { bolt = "bolt", nut = "nut" }

[[task]]
id = "hole_count"
format = "synthetic"
n_train = 4
n_test = 2
''')
    return tmp_path / "line.toml"


def test_toml_stream_round_trip(tmp_path):
    tasks = load_stream(build_stream_dir(tmp_path))
    assert [t.task_id for t in tasks] == ["seal", "part", "hole_count"]
    seal, part, holes = tasks
    assert (len(seal.train), len(seal.test), seal.answers, seal.domain) == (2, 1, ["yes", "no"], "rubber seal ring")
    assert seal.test_instructions == ["Is the ring torn?"]
    assert part.answers == ["bolt", "nut"] and len(part.train) == 4 and len(part.test) == 2
    assert part.test_instructions == ["Which part do you see?"]
    assert {s.instruction for s in part.test} == {"Which part do you see?"}
    assert all(s.load_image().shape == (16, 16, 3) for t in (seal, part) for s in t.train + t.test)
    assert len(holes.train) == 4 and holes.domain == "metal plate"
    same = synthetic.make_task("hole_count", seed=3, n_train=4, n_test=2)  # [stream] seed applies
    assert all(np.array_equal(a.load_image(), b.load_image()) for a, b in zip(holes.train, same.train))
    assert [t.task_id for t in resolve_stream(tmp_path / "line.toml")] == ["seal", "part", "hole_count"]


@pytest.mark.parametrize("edit, error, pattern", [
    (('format = "llava"', 'format = "csv"'), ConfigError, r"task #0 \('seal'\), field 'format': unknown format 'csv'"),
    (('domain = "rubber seal ring"', 'colour = "red"'), ConfigError, r"task #0 \('seal'\), field 'colour': unknown"),
    (('train = "seal/train.json"', 'train = "seal/nope.json"'), ConfigError, r"field 'train': file .*nope\.json does not exist"),
    (('id = "part"', 'id = "seal"'), ConfigError, r"task #1 \('seal'\), field 'id': duplicate task id"),
    (('n_train = 4', 'n_train = 0'), ConfigError, r"task #2 \('hole_count'\), field 'n_train': must be an integer >= 1"),
    (('id = "hole_count"', 'id = "holes"'), ConfigError, r"field 'id': 'holes' is not a built-in synthetic task"),
    (('domain = "rubber seal ring"', 'metric = "bleu"'), ConfigError, r"field 'metric': unknown metric 'bleu'"),
    (('instructions = ["What part is this?", "Name the part."]', ''), ConfigError, r"task #1 \('part'\), field 'instructions': is required"),
    (('answers = ["yes", "no"]', 'answers = ["ok", "torn"]'), DataError, r"line\.toml: task #0 \('seal'\).*t1.*answer 'yes' is not in"),
])
def test_toml_stream_errors_name_file_and_field(tmp_path, edit, error, pattern):
    path = build_stream_dir(tmp_path)
    path.write_text(path.read_text().replace(*edit, 1))
    with pytest.raises(error, match=pattern) as info:
        load_stream(path)
    assert str(path) in str(info.value)


def test_toml_stream_reader_error_names_toml_and_json(tmp_path):
    path = build_stream_dir(tmp_path)
    (tmp_path / "seal" / "images" / "b.png").unlink()
    with pytest.raises(DataError, match=r"line\.toml: task #0 \('seal'\): .*train\.json record #1 \(id 't2'\)"):
        load_stream(path)


def test_toml_stream_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: stream file not found"):
        load_stream(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[[task]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_stream(tmp_path / "bad.toml")
    (tmp_path / "empty.toml").write_text("[stream]\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"empty\.toml: no tasks"):
        load_stream(tmp_path / "empty.toml")
    with pytest.raises(ConfigError, match="unknown built-in stream 'factory'"):
        builtin_stream("factory")


# --------------------------------------------------------------------------- synthetic stream


def test_builtin_stream_order_domains_and_images(stream):
    assert [t.task_id for t in stream] == ["seal_defect", "hole_count", "cable_color", "plate_defect",
                                           "label_orientation", "part_type"]
    assert [t.answers for t in stream] == [["yes", "no"], ["1", "2", "3", "4"], ["red", "green", "blue", "yellow"],
                                           ["yes", "no"], ["up", "down", "left", "right"],
                                           ["bolt", "nut", "washer", "gear"]]
    for t in stream:
        assert len(t.train) == N_TRAIN and len(t.test) == N_TEST and t.metric == "exact" and t.domain
        for s in t.train + t.test:
            img = s.load_image()
            assert img.dtype == np.uint8 and img.shape == (64, 64, 3) and s.task_id == t.task_id
    assert [t.task_id for t in builtin_stream("inspection", 0, 2, 1)] == [t.task_id for t in stream]


def test_synthetic_stream_is_deterministic(stream):
    again = synthetic.inspection_stream(seed=0, n_train=N_TRAIN, n_test=N_TEST)
    for a, b in zip(stream, again):
        for x, y in zip(a.train + a.test, b.train + b.test):
            assert x.load_image().tobytes() == y.load_image().tobytes()
            assert (x.instruction, x.answer) == (y.instruction, y.answer)
    other = synthetic.make_task("hole_count", seed=1, n_train=N_TRAIN, n_test=N_TEST)
    assert not np.array_equal(stream[1].train[0].load_image(), other.train[0].load_image())


def test_images_are_distinct_within_and_across_splits(stream):
    for t in stream:
        blobs = [s.load_image().tobytes() for s in t.train + t.test]
        assert len(set(blobs)) == len(blobs), t.task_id


def test_answers_are_balanced_at_default_size():
    task = synthetic.make_task("hole_count")  # n_train=200, n_test=50
    assert (len(task.train), len(task.test)) == (200, 50)
    assert Counter(s.answer for s in task.train) == {a: 50 for a in task.answers}
    test_counts = Counter(s.answer for s in task.test)
    assert set(test_counts) == set(task.answers) and max(test_counts.values()) - min(test_counts.values()) <= 1


def test_answers_and_phrasings_balanced_in_every_task(stream):
    for t in stream:
        for split, n in ((t.train, N_TRAIN), (t.test, N_TEST)):
            counts = Counter(s.answer for s in split)
            assert sum(counts.values()) == n and max(counts.values()) - min(counts.values()) <= 1, t.task_id
        assert Counter(s.instruction for s in t.train) == {p: 2 for p in t.train_instructions}


def test_phrasings_six_train_three_unseen_test_paraphrases(stream):
    all_train = {normalize_answer(p) for t in stream for p in t.train_instructions}
    for t in stream:
        train, test = synthetic.instructions(t)
        assert (train, test) == (t.train_instructions, t.test_instructions)
        assert len(train) == 6 and len(test) == 3 and len(set(train + test)) == 9
        assert {s.instruction for s in t.test} == set(test) and {s.instruction for s in t.train} == set(train)
        train_words = set().union(*(words(p) for p in train)) - {"the", "is", "this", "a", "in", "of"}
        for phrase in test:
            assert normalize_answer(phrase) not in all_train, phrase
            assert words(phrase) & train_words, f"{phrase!r} shares no content word with the train phrasings"


def test_shared_question_pair_and_shared_domain_pair(stream):
    by_id = {t.task_id: t for t in stream}
    seal, plate, holes = by_id["seal_defect"], by_id["plate_defect"], by_id["hole_count"]
    # Same question, different image domain: only the image tells them apart.
    assert seal.train_instructions == plate.train_instructions
    assert seal.test_instructions == plate.test_instructions
    assert seal.domain != plate.domain
    # Same image domain, different question: only the text tells them apart.
    assert holes.domain == plate.domain == "metal plate"
    assert not set(holes.train_instructions + holes.test_instructions) & set(
        plate.train_instructions + plate.test_instructions)
    domains = [t.domain for t in stream]
    assert len(set(domains)) == 5


def test_tasks_need_more_than_the_mean_colour():
    """A nearest-centroid classifier on mean RGB is near chance on every task but the colour one."""
    for task_id in ("seal_defect", "hole_count", "plate_defect", "label_orientation", "part_type"):
        t = synthetic.make_task(task_id, seed=0, n_train=60, n_test=40)
        feats = {id(s): s.load_image().reshape(-1, 3).mean(0) for s in t.train + t.test}
        cents = {a: np.mean([feats[id(s)] for s in t.train if s.answer == a], axis=0) for a in t.answers}
        hits = [min(cents, key=lambda a: np.linalg.norm(feats[id(s)] - cents[a])) == s.answer for s in t.test]
        assert np.mean(hits) < 1 / len(t.answers) + 0.25, task_id


def test_contact_sheet_written(stream):
    sheet = synthetic.contact_sheet(stream, per_task=8, zoom=2)
    assert sheet.shape == (6 * 128, 8 * 128, 3) and sheet.dtype == np.uint8
    Image.fromarray(sheet).save("/tmp/kaizen_stream.png")


# --------------------------------------------------------------------------- generic data


def test_generic_samples_deterministic_and_well_formed():
    a = generic.generic_instruction_samples(0, 12)
    b = generic.generic_instruction_samples(0, 12)
    assert [s.load_image().tobytes() for s in a] == [s.load_image().tobytes() for s in b]
    assert [(s.instruction, s.answer) for s in a] == [(s.instruction, s.answer) for s in b]
    assert all(s.load_image().shape == (64, 64, 3) and s.answer for s in a)
    assert len({s.instruction for s in a}) > 6
    pairs = generic.generic_caption_pairs(0, 14)
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 and text for img, text in pairs)
    assert [t for _, t in pairs] == [t for _, t in generic.generic_caption_pairs(0, 14)]
    assert generic.generic_caption_pairs(1, 14)[0][0].tobytes() != pairs[0][0].tobytes()


def test_generic_answers_are_true_for_counts_and_arrows():
    for i in range(60):
        kind, p, question, answer = generic.instruction_spec(0, i)
        if kind == "shapes" and "many" in question.lower():
            assert answer == str(p["count"])
        if kind == "arrow":
            assert answer == p["direction"]


def generic_texts(n: int = 3000) -> list[str]:
    texts = [q for family in generic.QUESTIONS.values() for q in family]
    texts += [generic.caption_spec(0, i)[2] for i in range(n)]
    texts += [generic.instruction_spec(0, i)[2] for i in range(n)]
    return texts


def test_generic_data_never_contains_stream_test_phrasings():
    tests = [p for spec in synthetic.SPECS.values() for p in spec.test_phrasings]
    corpus = generic.corpus_text()
    for text in set(generic_texts()) | set(corpus):
        for phrase in tests:
            assert not contains_sentence(text, phrase), (text, phrase)
    for phrase in tests:  # the check itself can fire
        assert contains_sentence(phrase + " please", phrase)


def test_generic_vocabulary_covers_every_stream_word():
    stream_words = set().union(*(words(p) for spec in synthetic.SPECS.values()
                                 for p in spec.train_phrasings + spec.test_phrasings))
    generic_words = set().union(*(words(t) for t in generic_texts()))
    assert stream_words - generic_words == set()
    corpus_words = set().union(*(words(t) for t in generic.corpus_text()))
    assert stream_words <= corpus_words


def test_corpus_has_train_phrasings_answers_and_domain_questions():
    corpus = generic.corpus_text()
    assert corpus == generic.corpus_text() and len(corpus) == len(set(corpus))
    for spec in synthetic.SPECS.values():
        assert set(spec.train_phrasings) <= set(corpus) and set(spec.answers) <= set(corpus)
    captions = [generic.caption_spec(0, i) for i in range(700)]
    # Question-style texts are paired with images of their own domain.
    for kind, needle in (("plate", "how many holes"), ("cable", "colour"), ("label", "label"),
                         ("ring", "seal"), ("parts", "part")):
        texts = [t for k, _, t in captions if k == kind]
        assert any(re.search(needle, t) for t in texts), kind
        assert not any(needle == "how many holes" and "how many holes" in t
                       for k, _, t in captions if k != "plate")
