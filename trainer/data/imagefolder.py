"""ImageFolder adapter: one sub-folder per label, plus an instruction template.

    root/
      yes/ 001.png 002.jpg ...
      no/  003.png ...

Each image becomes a Sample whose answer is its folder name (or `answer_map[folder]`) and
whose instruction is one of the given phrasings (spread evenly over the images in a shuffled,
seeded order). The answer set is the folder names (or the mapping's values), sorted.
Hidden files (".DS_Store") are skipped; any other file that is not an image is an error, as
are an empty label folder and a root without label folders.

    samples = read_imagefolder("seal/train", ["Is the seal torn?"], task_id="seal")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .types import DataError, Sample, check_image_file, unique_in_order

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def label_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root does not exist or is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no label folders; put each label's images in a sub-folder "
                        "named after the label")
    return folders


def image_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_EXTS:
            raise DataError(f"{p}: not an image file (extension {p.suffix or 'none'}); ImageFolder "
                            f"label folders may hold only images ({', '.join(IMAGE_EXTS)})")
        files.append(p)
    if not files:
        raise DataError(f"{folder}: label folder {folder.name!r} has no images")
    return files


def folder_answer(folder: Path, answer_map: dict[str, str] | None) -> str:
    if answer_map is None:
        return folder.name
    if folder.name not in answer_map:
        raise DataError(f"{folder}: label folder {folder.name!r} is missing from the answer "
                        f"mapping {sorted(answer_map)}; add it")
    return str(answer_map[folder.name])


def imagefolder_answers(root: str | Path, answer_map: dict[str, str] | None = None) -> list[str]:
    """The closed answer set: folder names, or the mapped answers, sorted and distinct."""
    return sorted(unique_in_order([folder_answer(f, answer_map) for f in label_folders(Path(root))]))


def read_imagefolder(root: str | Path, instructions: list[str], task_id: str = "task",
                     answer_map: dict[str, str] | None = None, seed: int = 0,
                     check_images: bool = True) -> list[Sample]:
    """Samples of one ImageFolder split. `instructions` are the phrasings to use."""
    root = Path(root)
    phrasings = [str(t).strip() for t in instructions]
    if not phrasings or not all(phrasings):
        raise DataError(f"{root}: an ImageFolder task needs a non-empty list of instructions "
                        "(no empty strings)")
    items: list[tuple[Path, str]] = []
    for folder in label_folders(root):
        answer = folder_answer(folder, answer_map)
        items += [(f, answer) for f in image_files(folder)]
    order = np.random.default_rng(seed).permutation(len(items))
    samples = []
    for rank, k in enumerate(order.tolist()):
        path, answer = items[k]
        where = f"{root} image {path.relative_to(root)}"
        if check_images:
            check_image_file(path, where)
        samples.append(Sample(image=path, instruction=phrasings[rank % len(phrasings)],
                              answer=answer, task_id=task_id, source=where))
    return samples
