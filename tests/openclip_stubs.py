"""Import open_clip in a test venv without torchvision (tests only; never product code).

open_clip imports torchvision at module level (transforms for its PIL pipeline, FrozenBatchNorm2d)
but kaizen never uses those paths: it builds the model with create_model and preprocesses itself.
import_open_clip() puts a throwaway `torchvision` in sys.modules just for the import when the real
one is missing, then removes it so transformers' availability checks still see no torchvision.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
          "torchvision.ops", "torchvision.ops.misc")


class _Stub:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision stub (tests/openclip_stubs.py): not available in this test venv")


def _modules() -> dict:
    mods = {name: types.ModuleType(name) for name in _NAMES}
    tf = mods["torchvision.transforms"]
    for name in ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop",
                 "ColorJitter", "Grayscale"):
        setattr(tf, name, type(name, (_Stub,), {}))
    tf.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
    tf.functional = mods["torchvision.transforms.functional"]
    mods["torchvision"].transforms = tf
    mods["torchvision"].ops = mods["torchvision.ops"]
    mods["torchvision.ops"].misc = mods["torchvision.ops.misc"]
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (_Stub,), {})
    return mods


def import_open_clip():
    """Import open_clip (stubbing torchvision only for the import if it is absent)."""
    if "open_clip" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import open_clip

        return open_clip
    import transformers  # noqa: F401  (open_clip imports it; it must not see the stub in its checks)

    mods = _modules()
    sys.modules.update(mods)
    try:
        import open_clip
    finally:
        for name in _NAMES:
            if sys.modules.get(name) is mods[name]:
                del sys.modules[name]
    return open_clip
