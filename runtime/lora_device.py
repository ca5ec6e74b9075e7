"""A task pack's LoRA ready for the decoder's device, made once per pack.

    cache = LoraCache(engine)                      # one per Station
    [dev] = cache.for_packs([pack])                # once per pack (a snapshot of the installed set)
    engine.generate(images, texts, prompt, dev)    # every decoder run feeds dev.feeds as they are

Numpy LoRA feeds cost, on every decoder run (the prefill, each generated token, the answer-scoring
pass), a validation and padding pass in Python and, in a GPU session, a host-to-device copy of the
whole adapter. A DeviceLora is validated and padded once; in a CUDA session (the session's first
provider is CUDAExecutionProvider) its arrays are OrtValues made once on that provider's device,
so nothing is copied per run. On the CPU it keeps the padded numpy arrays: ORT reads a numpy feed
in place there, and its Python check of each OrtValue feed costs ~1.5 us per input per run
(measured, bench/lora_feeds.py), so OrtValues would make the CPU path slower.

ONNX Runtime's own LoraAdapter was measured against this (bench/lora_feeds.py): no faster on the
CPU, and its Python binding (1.32) only memory-maps an .onnx_adapter file on the host, without a
device allocator, so a CUDA session would still copy it per run; it also needs a file per pack
and RunOptions keeps only a bare pointer to it (a freed adapter gave wrong answers, then a crash).
So the pack format stays as it is (adapter.npz).

LoraCache keeps one DeviceLora per pack content (LoadedPack.sha) across the Station's snapshots:
a new snapshot reuses what the last one had; a pack that leaves the installed set (a newer
version, a rollback, a removal) is dropped from the cache and freed once no request in flight
holds the snapshot that had it. The golden probe's DeviceLora serves the pack it checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import onnxruntime as ort

from .errors import PackError


def session_device(session) -> tuple[str, int]:
    """(device_type, device_id) where `session` wants its inputs: ("cuda", id) when its first
    provider is CUDAExecutionProvider, else ("cpu", 0); ORT copies inputs of other providers."""
    providers = session.get_providers()
    if providers and providers[0] == "CUDAExecutionProvider":
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


@dataclass(frozen=True, eq=False)
class DeviceLora:
    """One pack's LoRA inputs, validated and padded, on the decoder's device (read-only: runs share them)."""

    feeds: Mapping[str, ort.OrtValue | np.ndarray]  # OrtValues on a CUDA session, numpy arrays on the CPU
    device: str  # "cpu" or "cuda:<id>"
    nbytes: int

    @classmethod
    def create(cls, arrays: Mapping[str, np.ndarray], session, ortvalues: bool | None = None) -> DeviceLora:
        """Place `arrays` (already validated and padded for this bundle: Engine.lora_feeds) on the
        device of `session`: OrtValues when `ortvalues` (default: only off the host), else read-only
        numpy arrays. PackError when the device refuses them (e.g. out of memory)."""
        device, device_id = session_device(session)
        where = device if device == "cpu" else f"{device}:{device_id}"
        if ortvalues is None:
            ortvalues = device != "cpu"
        values, nbytes = {}, 0
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            nbytes += arr.nbytes
            if not ortvalues:
                if arr.flags.writeable:  # never a caller's array that it may change later
                    arr = arr.copy()
                    arr.flags.writeable = False
                values[name] = arr
                continue
            try:
                values[name] = ort.OrtValue.ortvalue_from_numpy(arr, device, device_id)
            except Exception as err:  # ORT's own exception types (Fail, RuntimeException, ...)
                raise PackError(f"could not place LoRA input {name!r} ({arr.nbytes} bytes) on {where}: {err}; "
                                "free device memory (fewer packs, a smaller base) or run on the CPU") from err
        return cls(MappingProxyType(values), where, nbytes)


class LoraCache:
    """DeviceLora per installed pack, made once per pack content (see the module docstring)."""

    def __init__(self, engine, make: Callable[[Mapping[str, np.ndarray]], DeviceLora] | None = None):
        self.engine = engine
        self._make = make or (lambda lora: DeviceLora.create(engine.lora_feeds(lora), engine.decoder))
        self._by_sha: dict[str, DeviceLora] = {}
        self.created = 0  # DeviceLoras made so far (a counter tests and status read)

    def make(self, lora: Mapping[str, np.ndarray]) -> DeviceLora:
        self.created += 1
        return self._make(lora)

    def for_packs(self, packs: Sequence, probed: Mapping[tuple[str, int], DeviceLora] | None = None
                  ) -> tuple[DeviceLora, ...]:
        """One DeviceLora per pack (LoadedPack: manifest, sha, lora), in order: the cached one, else
        `probed`'s for its (task, version) (the golden probe of the install that added it), else
        a new one. The cache then holds exactly these packs' values."""
        kept: dict[str, DeviceLora] = {}
        for p in packs:
            dev = kept.get(p.sha) or self._by_sha.get(p.sha) or (probed or {}).get((p.manifest.task_id, p.manifest.version))
            kept[p.sha] = dev if dev is not None else self.make(p.lora)
        self._by_sha = kept
        return tuple(kept[p.sha] for p in packs)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self._by_sha.values())
