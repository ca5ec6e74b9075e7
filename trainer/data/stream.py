"""Task streams: an ordered list of tasks, from a TOML file or built in.

A stream file lists tasks in training order; paths are relative to the TOML file:

    [stream]                      # optional
    seed = 0                      # default seed of synthetic tasks and ImageFolder phrasings

    [[task]]
    id = "seal"
    format = "llava"              # "llava" | "imagefolder" | "synthetic"
    train = "seal/train.json"     # llava: JSON file; imagefolder: a label-folder root
    test = "seal/test.json"
    images = "seal/images"        # llava only; default: the JSON file's folder
    answers = ["yes", "no"]       # closed answer set (optional; ImageFolder: the folder names)
    metric = "exact"              # optional
    domain = "rubber seal ring"   # optional

    [[task]]
    id = "part"
    format = "imagefolder"
    train = "parts/train"
    test = "parts/test"
    instructions = ["What part is this?"]         # train phrasings (required)
    test_instructions = ["Which part is shown?"]  # default: the train phrasings
    answer_map = { bolt_m6 = "bolt", nut_m6 = "nut" }   # optional folder -> answer

    [[task]]
    id = "hole_count"             # a built-in synthetic task id
    format = "synthetic"
    n_train = 200                 # optional (defaults 200 / 50), plus optional seed
    n_test = 50

Every error names the file, the task (index and id) and the field.

    tasks = load_stream("line3.toml")
    tasks = builtin_stream("inspection", seed=0, n_train=200, n_test=50)
    tasks = resolve_stream("inspection")   # a built-in name, or a TOML path
"""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport, a declared dependency there
    import tomli as tomllib

from kaizen.runtime.errors import ConfigError

from . import synthetic
from .imagefolder import imagefolder_answers, read_imagefolder
from .llava_json import read_llava_json
from .types import KNOWN_METRICS, DataError, Task

BUILTIN_STREAMS = ("inspection", "realdev")
COMMON_KEYS = {"id", "format", "answers", "metric", "domain"}
FORMAT_KEYS = {
    "llava": COMMON_KEYS | {"train", "test", "images"},
    "imagefolder": COMMON_KEYS | {"train", "test", "instructions", "test_instructions", "answer_map"},
    "synthetic": COMMON_KEYS | {"seed", "n_train", "n_test"},
}
STREAM_KEYS = {"name", "seed"}


def builtin_stream(name: str = "inspection", seed: int = 0, n_train: int = 200,
                   n_test: int = 50) -> list[Task]:
    """A built-in stream by name; "inspection" is the six-task synthetic stream."""
    if name not in BUILTIN_STREAMS:
        raise ConfigError(f"unknown built-in stream {name!r}; use one of {list(BUILTIN_STREAMS)} "
                          "or the path of a stream TOML file")
    if name == "realdev":  # real images (clip art + MNIST): trainer/data/realdev.py
        from .realdev import realdev_stream
        return realdev_stream(seed=seed, n_train=n_train, n_test=n_test)
    return synthetic.inspection_stream(seed=seed, n_train=n_train, n_test=n_test)


def resolve_stream(spec: str | Path, seed: int = 0, n_train: int = 200, n_test: int = 50) -> list[Task]:
    """A built-in stream name (seed and sizes apply) or the path of a stream TOML file."""
    if str(spec) in BUILTIN_STREAMS:
        return builtin_stream(str(spec), seed, n_train, n_test)
    return load_stream(spec)


class _Fields:
    """Typed access to one [[task]] table; errors name the file, the task and the field."""

    def __init__(self, path: Path, index: int, table: dict):
        self.path, self.table = path, table
        self.where = f"{path}: task #{index}" + (f" ({table['id']!r})" if "id" in table else "")

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}, field '{field}': {message}")

    def string(self, field: str, default: str | None = None) -> str:
        value = self.table.get(field, default)
        if value is None:
            raise self.error(field, "is required")
        if not isinstance(value, str) or not value.strip():
            raise self.error(field, f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, field: str, default: int, minimum: int = 0) -> int:
        value = self.table.get(field, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(field, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def strings(self, field: str, required: bool = False) -> list[str] | None:
        value = self.table.get(field)
        if value is None:
            if required:
                raise self.error(field, "is required (a list of strings)")
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.error(field, f"must be a non-empty list of non-empty strings, got {value!r}")
        return value

    def path_of(self, field: str, must_be_dir: bool, required: bool = True) -> Path | None:
        if field not in self.table and not required:
            return None
        p = self.path.parent / self.string(field)
        if must_be_dir and not p.is_dir():
            raise self.error(field, f"folder {p} does not exist")
        if not must_be_dir and not p.is_file():
            raise self.error(field, f"file {p} does not exist")
        return p

    def mapping(self, field: str) -> dict[str, str] | None:
        value = self.table.get(field)
        if value is None:
            return None
        if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
            raise self.error(field, f"must be a table of folder = \"answer\" strings, got {value!r}")
        return value


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: stream file not found")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from err


def _build_task(f: _Fields, stream_seed: int) -> Task:
    fmt = f.string("format")
    if fmt not in FORMAT_KEYS:
        raise f.error("format", f"unknown format {fmt!r}; use one of {sorted(FORMAT_KEYS)}")
    unknown = sorted(set(f.table) - FORMAT_KEYS[fmt])
    if unknown:
        raise f.error(unknown[0], f"unknown for format {fmt!r}; allowed: {sorted(FORMAT_KEYS[fmt])}")
    task_id = f.string("id")
    metric = f.string("metric", "exact")
    if metric not in KNOWN_METRICS:
        raise f.error("metric", f"unknown metric {metric!r}; use one of {list(KNOWN_METRICS)}")
    common = {"metric": metric, "domain": f.string("domain", "-") if "domain" in f.table else ""}
    answers = f.strings("answers")
    if fmt == "synthetic":
        if task_id not in synthetic.TASK_IDS:
            raise f.error("id", f"{task_id!r} is not a built-in synthetic task; use one of "
                                f"{list(synthetic.TASK_IDS)}")
        task = synthetic.make_task(task_id, f.integer("seed", stream_seed),
                                   f.integer("n_train", 200, 1), f.integer("n_test", 50, 1))
        if answers is not None or "domain" in f.table or "metric" in f.table:
            task = Task(task_id, task.train, task.test, answers or task.answers, common["metric"],
                        task.train_instructions, task.test_instructions,
                        common["domain"] or task.domain)
        return task
    if fmt == "llava":
        images = f.path_of("images", must_be_dir=True, required=False)
        train = read_llava_json(f.path_of("train", must_be_dir=False), images, task_id)
        test = read_llava_json(f.path_of("test", must_be_dir=False), images, task_id)
        return Task(task_id, train, test, answers, **common)
    instructions = f.strings("instructions", required=True)
    test_instructions = f.strings("test_instructions") or instructions
    answer_map = f.mapping("answer_map")
    train_root, test_root = f.path_of("train", True), f.path_of("test", True)
    train = read_imagefolder(train_root, instructions, task_id, answer_map, stream_seed)
    test = read_imagefolder(test_root, test_instructions, task_id, answer_map, stream_seed + 1)
    if answers is None:
        answers = sorted(set(imagefolder_answers(train_root, answer_map))
                         | set(imagefolder_answers(test_root, answer_map)))
    return Task(task_id, train, test, answers, train_instructions=list(instructions),
                test_instructions=list(test_instructions), **common)


def load_stream(path: str | Path) -> list[Task]:
    """The tasks of a stream TOML file, in file order."""
    path = Path(path)
    doc = _read_toml(path)
    unknown = sorted(set(doc) - {"stream", "task"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r}; use [stream] and [[task]]")
    header = doc.get("stream", {})
    if not isinstance(header, dict) or set(header) - STREAM_KEYS:
        raise ConfigError(f"{path}: [stream] may only hold {sorted(STREAM_KEYS)}")
    seed = header.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{path}: [stream] field 'seed' must be an integer, got {seed!r}")
    tables = doc.get("task")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no tasks; list them in order as [[task]] tables")
    tasks: list[Task] = []
    for index, table in enumerate(tables):
        fields = _Fields(path, index, table)
        try:
            task = _build_task(fields, seed)
        except DataError as err:
            raise DataError(f"{fields.where}: {err}") from err
        if any(t.task_id == task.task_id for t in tasks):
            raise fields.error("id", f"duplicate task id {task.task_id!r}; ids must be unique")
        tasks.append(task)
    return tasks
