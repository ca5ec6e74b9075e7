"""Photos stored sideways with an EXIF orientation tag (phones, many cameras) are read upright, the
same way by the station (encoded bytes, paths, PIL images) and by the trainer (data files), as a
viewer shows them and as they were labelled; a broken tag leaves the pixels as stored."""

import io

import numpy as np
import pytest
from PIL import Image

from kaizen.runtime.preprocess import EXIF_ORIENTATION, load_rgb
from kaizen.trainer.data.types import read_rgb

# Upright: 40 rows x 80 columns, left half dark, right half light (a wide part, "label on the right").
UPRIGHT = np.full((40, 80, 3), 230, np.uint8)
UPRIGHT[:, :40] = 20


def _jpeg(pixels: np.ndarray, orientation) -> bytes:
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _is_upright(arr: np.ndarray) -> bool:
    return arr.shape == UPRIGHT.shape and arr[:, :30].mean() < 60 and arr[:, 50:].mean() > 190


# orientation -> how the camera stored the upright pixels (EXIF: turn the stored image this way to view it)
STORED = {1: UPRIGHT, 3: np.rot90(UPRIGHT, 2), 6: np.rot90(UPRIGHT, 1), 8: np.rot90(UPRIGHT, -1),
          2: UPRIGHT[:, ::-1]}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_station_and_trainer_read_photos_upright(orientation, tmp_path):
    data = _jpeg(np.ascontiguousarray(STORED[orientation]), orientation)
    path = tmp_path / "part.jpg"
    path.write_bytes(data)
    from_bytes = np.asarray(load_rgb(data))
    assert _is_upright(from_bytes)
    assert np.array_equal(np.asarray(load_rgb(path)), from_bytes)
    with Image.open(io.BytesIO(data)) as img:
        assert np.array_equal(np.asarray(load_rgb(img)), from_bytes)
    assert np.array_equal(read_rgb(path), from_bytes)  # the trainer sees what the station sees


@pytest.mark.parametrize("orientation", [None, 0, 9, 65535])
def test_no_or_out_of_range_tag_keeps_the_pixels_as_stored(orientation):
    sideways = np.ascontiguousarray(np.rot90(UPRIGHT, 1))
    got = np.asarray(load_rgb(_jpeg(sideways, orientation)))
    assert got.shape == sideways.shape


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")  # pillow says so; no error
def test_corrupt_exif_block_keeps_the_pixels_and_does_not_fail(tmp_path):
    buf = io.BytesIO()
    corrupt = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"  # TIFF header whose first IFD lies past the end
    Image.fromarray(np.ascontiguousarray(np.rot90(UPRIGHT, 1))).save(buf, "JPEG", exif=corrupt)
    (tmp_path / "bad.jpg").write_bytes(buf.getvalue())
    assert np.asarray(load_rgb(buf.getvalue())).shape == (80, 40, 3)
    assert read_rgb(tmp_path / "bad.jpg").shape == (80, 40, 3)
