"""Array and JSON members of a task pack: encode, decode (never with pickle) and check shapes.

Every check raises ValueError with a message that starts with the member name; pack.py turns it
into a PackError that also names the pack file.

    data = npy_bytes(prompt); prompt = load_npy("prompt.npy", data)
    check_arrays(manifest, prompt, key, text_emb, lora)
    check_lora_fits(lora, bundle.lora_shapes())   # the pack's LoRA targets exist in the bundle
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import jsonsafe
from .manifest import Manifest

LORA_NAME_RE = re.compile(r"^lora\.(\d+)\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.(A|B)$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEY_NORM_TOLERANCE = 1e-3
MAX_NPZ_ENTRIES = 4096


@dataclass(frozen=True)
class GoldenSample:
    """One health-probe example: PNG bytes, the instruction and the expected answer."""

    image: bytes
    instruction: str
    answer: str


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{name: np.ascontiguousarray(a) for name, a in sorted(arrays.items())})
    return buf.getvalue()


def load_npy(name: str, data: bytes) -> np.ndarray:
    """Decode .npy bytes without pickle, after checking that the header's shape and dtype
    account for exactly the bytes present (numpy would allocate the claimed size first)."""
    _check_npy_size(name, data)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{name}: not a readable .npy array without pickle ({err})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name}: not a .npy array")  # noqa: TRY004 - refusal reasons are ValueErrors
    return array


def _check_npy_size(name: str, data: bytes) -> None:
    buf = io.BytesIO(data)
    try:
        major, minor = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get((major, minor))
        if read_header is None:
            raise ValueError(f".npy format version {major}.{minor} is not supported")
        shape, _, dtype = read_header(buf)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise ValueError(f"{name}: not a readable .npy array without pickle ({err})") from None
    if dtype.hasobject:
        raise ValueError(f"{name}: not a readable .npy array without pickle (object dtype)")
    want = int(np.prod(shape, dtype=object)) * dtype.itemsize
    have = len(data) - buf.tell()
    if want != have:
        raise ValueError(f"{name}: header says shape {list(shape)} of {dtype} ({want} bytes) "
                         f"but {have} bytes follow it")


def load_npz(name: str, data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """Load an .npz after checking its uncompressed size (no zip bombs) and member names."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_NPZ_ENTRIES:
                raise ValueError(f"{name}: {len(infos)} entries, cap {MAX_NPZ_ENTRIES}")
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise ValueError(f"{name}: {total} bytes once unpacked, cap {max_bytes}")
            out: dict[str, np.ndarray] = {}
            for info in infos:
                entry = f"{name}[{info.filename}]"
                if not info.filename.endswith(".npy") or info.filename[:-4] in out:
                    raise ValueError(f"{name}: unexpected or duplicate entry {info.filename!r}")
                if info.flag_bits & 0x1:
                    raise ValueError(f"{entry}: encrypted zip entry (packs are never encrypted)")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise ValueError(f"{entry}: zip compression method {info.compress_type} "
                                     "(only stored or deflated entries are read)")
                out[info.filename[:-4]] = load_npy(entry, zf.read(info))
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
            EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{name}: not an .npz (zip) file ({err})") from None


def check_array(name: str, array: Any, ndim: int, shape: tuple[int | None, ...] | None = None) -> None:
    """float32, `ndim` dimensions, the given sizes (None = any), and every value finite."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(array).__name__}")  # noqa: TRY004
    if array.dtype != np.float32:
        raise ValueError(f"{name}: dtype {array.dtype}, expected float32")
    if array.ndim != ndim:
        raise ValueError(f"{name}: {array.ndim} dimensions {list(array.shape)}, expected {ndim}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(array.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name}: shape {list(array.shape)}, axis {axis} should be {want}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite values")


def check_arrays(manifest: Manifest, prompt: np.ndarray, key: np.ndarray, text_emb: np.ndarray,
                 lora: dict[str, np.ndarray]) -> None:
    """The arrays agree with each other and with the manifest (ARCHITECTURE.md, TASKPACK.md)."""
    check_array("prompt.npy", prompt, 2, (manifest.prompt_tokens, None))
    dims = list(manifest.query_dims)
    check_array("key.npy", key, 1, (sum(dims),) if dims else None)
    halves = [key] if not dims else [key[: dims[0]], key[dims[0]:]]
    for what, half in zip(("", "image key ", "text key ")[len(halves) - 1:], halves):
        norm = float(np.linalg.norm(half))
        if abs(norm - 1.0) > KEY_NORM_TOLERANCE:
            raise ValueError(f"key.npy: {what}norm {norm:.4f}, expected a unit vector")
    text_width = dims[1] if dims else key.shape[0]
    check_array("text_emb.npy", text_emb, 2, (len(manifest.instructions), text_width))
    check_lora(lora, manifest.lora_rank)


def check_lora(lora: dict[str, np.ndarray], rank: int) -> None:
    """Names `lora.<i>.<target>.A|B`, A [r, in] and B [out, r] in pairs, r == rank."""
    if rank == 0 and lora:
        raise ValueError("adapter.npz: lora_rank is 0 but the adapter has arrays")
    if rank > 0 and not lora:
        raise ValueError(f"adapter.npz: lora_rank is {rank} but the adapter is empty")
    for name, array in sorted(lora.items()):
        match = LORA_NAME_RE.match(name)
        if not match:
            raise ValueError(f"adapter.npz[{name}]: name must look like 'lora.0.q_proj.A' or '.B'")
        is_a = match.group(3) == "A"
        check_array(f"adapter.npz[{name}]", array, 2, (rank, None) if is_a else (None, rank))
        partner = name[:-1] + ("B" if is_a else "A")
        if partner not in lora:
            raise ValueError(f"adapter.npz[{name}]: its pair {partner} is missing")


def lora_targets_of(names) -> list[str]:
    """The targets named by LoRA array/input names `lora.<i>.<target>.A|B`, in first-seen order."""
    out: list[str] = []
    for name in names:
        match = LORA_NAME_RE.match(name)
        if match and match.group(2) not in out:
            out.append(match.group(2))
    return out


def check_lora_fits(lora, decoder_inputs) -> None:
    """Every LoRA array of a pack names an input of the bundle's decoder (`decoder_inputs`: the
    bundle's base.json lora.shapes); ValueError naming the targets it does not have. Fewer
    targets than the bundle is fine: a decoder LoRA input left out defaults to zero."""
    extra = sorted(n for n in lora if n not in decoder_inputs)
    if extra:
        missing = lora_targets_of(extra)
        raise ValueError(f"adapter.npz: LoRA target(s) {missing} ({len(extra)} arrays, e.g. {extra[0]}) have no "
                         f"input in this bundle's decoder, whose LoRA targets are "
                         f"{lora_targets_of(decoder_inputs)}: train with those targets "
                         "(--option lora_targets=...) or export the bundle with --lora-targets including them")


def load_answers(data: bytes) -> list[str]:
    answers = _json("answers.json", data)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError("answers.json: must be a non-empty list of non-empty strings")
    if len(set(answers)) != len(answers):
        raise ValueError("answers.json: has duplicate answers")
    return answers


def answers_bytes(answers: list[str]) -> bytes:
    return (json.dumps(list(answers), ensure_ascii=False, indent=1) + "\n").encode()


def golden_members(golden: list[GoldenSample] | tuple[GoldenSample, ...]) -> dict[str, bytes]:
    """golden/golden.json + golden/<i>.png for each sample (empty dict for no samples)."""
    if not golden:
        return {}
    entries, files = [], {}
    for i, sample in enumerate(golden):
        path = f"golden/{i}.png"
        entries.append({"image": path, "instruction": sample.instruction, "answer": sample.answer})
        files[path] = sample.image
    files["golden/golden.json"] = (json.dumps(entries, ensure_ascii=False, indent=1) + "\n").encode()
    _parse_golden(files)  # same rules as the reader
    return files


def load_golden(members: dict[str, bytes]) -> list[GoldenSample]:
    """Parse golden/golden.json and its PNGs out of the members (empty list if none)."""
    if "golden/golden.json" not in members:
        stray = sorted(n for n in members if n.startswith("golden/"))
        if stray:
            raise ValueError(f"{stray[0]}: golden images without golden/golden.json")
        return []
    return _parse_golden(members)


def _parse_golden(members: dict[str, bytes]) -> list[GoldenSample]:
    entries = _json("golden/golden.json", members["golden/golden.json"])
    if not isinstance(entries, list):
        raise ValueError("golden/golden.json: must be a list of {image, instruction, answer}")  # noqa: TRY004
    samples, used = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"image", "instruction", "answer"}:
            raise ValueError(f"golden/golden.json: item {i} must have exactly image, instruction, answer")
        if not all(isinstance(entry[k], str) and entry[k] for k in entry):
            raise ValueError(f"golden/golden.json: item {i} fields must be non-empty strings")
        image = entry["image"]
        if image not in members:
            raise ValueError(f"golden/golden.json: item {i} names {image}, which is not in the pack")
        if not members[image].startswith(PNG_MAGIC):
            raise ValueError(f"{image}: not a PNG file")
        used.add(image)
        samples.append(GoldenSample(members[image], entry["instruction"], entry["answer"]))
    unused = sorted(n for n in members if n.startswith("golden/") and n != "golden/golden.json"
                    and n not in used)
    if unused:
        raise ValueError(f"{unused[0]}: not referenced by golden/golden.json")
    return samples


def _json(name: str, data: bytes) -> Any:
    return jsonsafe.loads(name, data)  # bounded nesting, strict JSON; ValueError naming `name`
