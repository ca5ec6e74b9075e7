"""The task pack manifest (manifest.json): one dataclass, validated on construction.

The field list and meanings are specified in runtime/TASKPACK.md; a test keeps the two in step.

    m = Manifest.from_json(data)        # ValueError naming the field on anything malformed
    data = m.to_json()                  # canonical bytes: the exact bytes that get signed
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

PACK_SCHEMA_VERSION = 2  # the newest schema this runtime reads and writes
SUPPORTED_SCHEMAS = (1, 2)  # 1: one shared key (aligned CLIP); 2: one key per query modality

TASK_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SEMVER_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")


class ManifestFieldError(ValueError):
    """A manifest field is missing or malformed; `.field` names it."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"field {field_name!r}: {problem}")
        self.field = field_name


def parse_version(text: str, what: str = "version") -> tuple[int, int, int]:
    """"0.1.0" -> (0, 1, 0); ValueError for anything that is not MAJOR.MINOR.PATCH."""
    match = SEMVER_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{what} must look like '0.1.0', got {text!r}")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Manifest:
    """What a pack is, what it was made for, and the sha256 of every file it carries."""

    schema_version: int
    task_id: str
    version: int
    method: str
    base_fingerprint: str
    min_runtime_version: str
    prompt_tokens: int
    lora_rank: int
    created_at: str
    instructions: list[str]
    sha256: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    signing_key_id: str = ""
    query_dims: list[int] = field(default_factory=list)  # schema 2: [d_img, d_txt] of key.npy's halves

    def __post_init__(self) -> None:
        bad = ManifestFieldError
        if not _is_int(self.schema_version) or self.schema_version < 1:
            raise bad("schema_version", f"must be an int >= 1, got {self.schema_version!r}")
        if self.schema_version not in SUPPORTED_SCHEMAS:
            raise bad("schema_version", f"pack uses schema {self.schema_version}, this runtime reads "
                      f"{list(SUPPORTED_SCHEMAS)}: use a runtime that matches the exporter")
        self._check_query_dims()
        if not isinstance(self.task_id, str) or not TASK_ID_RE.match(self.task_id):
            raise bad("task_id", f"must be a slug of [a-z0-9_-] (max 64, starting alphanumeric), "
                      f"got {self.task_id!r}")
        if not _is_int(self.version) or self.version < 1:
            raise bad("version", f"must be an int >= 1, got {self.version!r}")
        for name in ("method", "base_fingerprint"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise bad(name, f"must be a non-empty string, got {value!r}")
        try:
            parse_version(self.min_runtime_version, "min_runtime_version")
        except ValueError as err:
            raise bad("min_runtime_version", str(err)) from None
        for name in ("prompt_tokens", "lora_rank"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, f"must be an int >= 0, got {getattr(self, name)!r}")
        self._check_created_at()
        self._check_instructions()
        self._check_sha256()
        if not isinstance(self.metrics, dict) or not all(isinstance(k, str) for k in self.metrics):
            raise bad("metrics", "must be an object with string keys")
        if not isinstance(self.signing_key_id, str) or not KEY_ID_RE.match(self.signing_key_id):
            raise bad("signing_key_id", f"must be 16 lowercase hex chars, got {self.signing_key_id!r}")

    def _check_query_dims(self) -> None:
        dims = self.query_dims
        if self.schema_version == 1:
            if dims:
                raise ManifestFieldError("query_dims", "is a schema 2 field; schema 1 packs carry one shared key")
            return
        if not isinstance(dims, list) or len(dims) != 2 or not all(_is_int(d) and 0 < d <= 65536 for d in dims):
            raise ManifestFieldError("query_dims", f"must be [d_img, d_txt], two ints in 1..65536, got {dims!r}")

    def _check_created_at(self) -> None:
        try:
            datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise ManifestFieldError("created_at", f"must be an ISO 8601 time string, "
                                     f"got {self.created_at!r}") from None

    def _check_instructions(self) -> None:
        items = self.instructions
        if not isinstance(items, list) or not items:
            raise ManifestFieldError("instructions", "must be a non-empty list of strings")
        for i, text in enumerate(items):
            if not isinstance(text, str) or not text.strip():
                raise ManifestFieldError("instructions", f"item {i} must be a non-empty string, got {text!r}")

    def _check_sha256(self) -> None:
        if not isinstance(self.sha256, dict) or not self.sha256:
            raise ManifestFieldError("sha256", "must be a non-empty object {file: hex digest}")
        for name, digest in self.sha256.items():
            if name in ("manifest.json", "manifest.sig"):
                raise ManifestFieldError("sha256", f"must not list {name}")
            if not isinstance(digest, str) or not HEX64_RE.match(digest):
                raise ManifestFieldError("sha256", f"entry {name!r} must be 64 lowercase hex chars")

    # ---- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.schema_version == 1:
            del out["query_dims"]  # schema 1 manifests stay byte-identical to what schema 1 wrote
        return out

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON (sorted keys, 2-space indent, trailing newline): the signed bytes."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestFieldError("<root>", "manifest must be a JSON object")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ManifestFieldError(unknown[0], f"unknown field (schema {PACK_SCHEMA_VERSION} "
                                     f"has {', '.join(names)})")
        for name in names:
            if name not in data and not (name == "query_dims" and data.get("schema_version") != 2):
                raise ManifestFieldError(name, "missing")
        if data.get("schema_version") != 2 and "query_dims" not in data:
            data = {**data, "query_dims": []}
        return cls(**data)

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise ManifestFieldError("<root>", f"not valid JSON ({err})") from None
        return cls.from_dict(parsed)


REQUIRED_FIELDS = tuple(f.name for f in fields(Manifest))
