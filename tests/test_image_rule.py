"""The one image rule (ldm.data.rgb) on every PIL mode with known pixel values, the same pixels in training,
evaluation, inpaint.py and make_shards.py, and the user-mask rule of ldm.image_io."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.decode import decode_image
from ldm.data.rgb import ImageLimits, ImageRejected, open_rgb, to_rgb8
from ldm.eval.data import load_folder
from ldm.image_io import load_mask, load_rgb, mask_from_image
from tests.helpers import load_script


def _file(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _on_white(colour: float, alpha: int) -> int:
    """Independent float form of compositing on a white background."""
    return int(np.floor(colour * alpha / 255 + 255 * (1 - alpha / 255) + 0.5))


def _image(mode: str, values: list) -> Image.Image:
    """A 1 x N image of ``mode`` holding ``values`` (ints, floats or tuples)."""
    img = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    return img


def _palette(transparent: int | None) -> Image.Image:
    img = _image("P", [0, 1, 2])
    img.putpalette([255, 0, 0, 0, 0, 255, 10, 20, 30])
    if transparent is not None:
        img.info["transparency"] = transparent
    return img


# mode -> (image, how it is stored, expected RGB per pixel); "mem" = PIL cannot write the mode, decoded in memory
CASES = {
    "1": (_image("1", [0, 1]), "PNG", [(0, 0, 0), (255, 255, 255)]),
    "L": (_image("L", [0, 77, 255]), "PNG", [(0, 0, 0), (77, 77, 77), (255, 255, 255)]),
    "LA": (_image("LA", [(200, 255), (200, 0), (100, 128)]), "PNG",
           [(200,) * 3, (255,) * 3, (_on_white(100, 128),) * 3]),
    "P": (_palette(None), "PNG", [(255, 0, 0), (0, 0, 255), (10, 20, 30)]),
    "P+transparency": (_palette(1), "PNG", [(255, 0, 0), (255, 255, 255), (10, 20, 30)]),
    "PA": (_image("PA", [(0, 255), (0, 0), (0, 128)]), "mem",  # default palette: index 0 is black
           [(0, 0, 0), (255, 255, 255), (_on_white(0, 128),) * 3]),
    "RGB": (_image("RGB", [(1, 2, 3), (250, 128, 0)]), "PNG", [(1, 2, 3), (250, 128, 0)]),
    "RGBA": (_image("RGBA", [(255, 0, 0, 255), (255, 0, 0, 128), (9, 9, 9, 0)]), "PNG",
             [(255, 0, 0), (255, _on_white(0, 128), _on_white(0, 128)), (255, 255, 255)]),
    "CMYK": (_image("CMYK", [(0, 255, 255, 0), (0, 0, 0, 0), (0, 0, 0, 255)]), "TIFF",
             [(255, 0, 0), (255, 255, 255), (0, 0, 0)]),
    "YCbCr": (_image("YCbCr", [(128, 128, 128), (81, 90, 240)]), "TIFF",
              # JFIF: R = Y + 1.402 (Cr-128), G = Y - 0.344136 (Cb-128) - 0.714136 (Cr-128), B = Y + 1.772 (Cb-128)
              [(128, 128, 128), (238, 14, 14)]),
    "I;16": (_image("I;16", [0, 32768, 65535, 77 * 257]), "PNG",
             [(0,) * 3, (128,) * 3, (255,) * 3, (77,) * 3]),
    "I;16B": (_image("I;16B", [0, 32768, 65535, 77 * 257]), "TIFF",
              [(0,) * 3, (128,) * 3, (255,) * 3, (77,) * 3]),
    "I": (_image("I", [0, 32768, 65535]), "TIFF", [(0,) * 3, (128,) * 3, (255,) * 3]),
    "F": (_image("F", [0.0, 0.5, 0.25, 1.0]), "TIFF", [(0,) * 3, (128,) * 3, (64,) * 3, (255,) * 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_decodes_to_the_right_8bit_rgb(case):
    img, fmt, expected = CASES[case]
    if fmt == "mem":
        out = to_rgb8(img)
    else:
        data = _file(img, fmt)
        assert Image.open(io.BytesIO(data)).mode == img.mode  # the file really holds this mode
        out = decode_image(data)
    assert out.mode == "RGB"
    got = np.asarray(out).reshape(-1, 3).tolist()
    tol = 1 if case == "YCbCr" else 0  # PIL's fixed-point YCbCr conversion
    assert np.abs(np.array(got) - np.array(expected)).max() <= tol, (case, got, expected)


def test_sixteen_bit_mid_grey_is_128_not_white():
    data = _file(Image.fromarray(np.full((4, 4), 32768, np.uint16)), "PNG")  # numpy uint16 -> I;16 PNG
    assert np.unique(np.asarray(decode_image(data))).tolist() == [128]
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL alone: white


@pytest.mark.parametrize("mode, values", [("I", [0, 70000]), ("I", [-1, 5]), ("F", [0.0, 1.5]),
                                          ("F", [0.0, float("nan")])])
def test_ambiguous_value_ranges_are_rejected_not_guessed(mode, values):
    with pytest.raises(ValueError, match="expected"):
        decode_image(_file(_image(mode, values), "TIFF"))


def test_unsupported_modes_are_named():
    with pytest.raises(ValueError, match="LAB"):
        to_rgb8(Image.new("LAB", (2, 2)))


def test_limits_are_read_from_the_header_before_decoding(monkeypatch):
    strip = _file(Image.new("L", (16000, 8), 90), "JPEG")

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    with pytest.raises(ImageRejected) as e:
        open_rgb(strip, ImageLimits(max_aspect_ratio=10))
    assert e.value.reason == "extreme_aspect"
    # without an aspect limit, the resize it would need (short side 8 -> 512: 1,024,000 x 512) is refused
    with pytest.raises(ImageRejected) as e:
        open_rgb(strip, ImageLimits(max_pixels=50_000_000), plan=lambda w, h: [(w * 64, h * 64)])
    assert e.value.reason == "too_large" and "resize output" in str(e.value)
    with pytest.raises(ImageRejected) as e:
        open_rgb(strip, ImageLimits(min_size=64))
    assert e.value.reason == "too_small"


# ------------------------------------------------------------------------------- one rule, every entry point
@pytest.fixture
def rgba_logo(tmp_path) -> Path:
    """A 64 x 48 RGBA image: opaque red square, half-transparent blue band, fully transparent (black) rest."""
    arr = np.zeros((48, 64, 4), np.uint8)
    arr[8:24, 8:24] = (255, 0, 0, 255)
    arr[30:40, :] = (0, 0, 255, 128)
    path = tmp_path / "logo.png"
    Image.fromarray(arr).save(path)
    (tmp_path / "logo.txt").write_text("a logo")
    return path


def test_training_eval_inpaint_and_make_shards_see_the_same_pixels(rgba_logo):
    training = np.asarray(decode_image(rgba_logo.read_bytes()))
    assert training[0, 0].tolist() == [255, 255, 255]  # transparent -> white background
    assert training[10, 10].tolist() == [255, 0, 0]
    assert training[35, 0].tolist() == [_on_white(0, 128), _on_white(0, 128), 255]
    assert np.array_equal(load_rgb(rgba_logo), training)  # scripts/inpaint.py
    evaluation = load_folder(rgba_logo.parent, 48)  # short side already 48: resize is a no-op, crop 48x48
    assert np.array_equal(evaluation[0].image, training[:, 8:56])
    make_shards = load_script("make_shards")
    records = list(make_shards.folder_records([(rgba_logo, "a logo", {})], rgba_logo.parent,
                                              make_shards.Skips(strict=True)))
    assert np.array_equal(np.asarray(records[0].image), training)


# ------------------------------------------------------------------------------------------- EXIF orientation
#: what a viewer shows for a stored H x W x C array with EXIF orientation n (EXIF 2.3: where row 0 / column 0 go)
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # row 0 is the left column
    6: lambda a: a[::-1].transpose(1, 0, 2),  # phone held upright, sensor sideways: turn 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),  # turn 90 degrees counter-clockwise
}


def _with_orientation(arr: np.ndarray, n: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = n
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _quadrants(h: int = 40, w: int = 64) -> np.ndarray:
    """Four flat colours, so a JPEG keeps them within a few levels and any turn or mirror is visible."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 255)
    return arr


def _assert_jpeg_close(pixels: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to JPEG error: flat areas within a few levels (chroma subsampling blurs only the colour edges)."""
    diff = np.abs(pixels.astype(int) - expected.astype(int)).max(axis=2)
    assert pixels.shape == expected.shape and np.median(diff) <= 2 and (diff > 8).mean() < 0.15


@pytest.mark.parametrize("n", range(1, 9))
def test_exif_orientation_is_applied(n):
    stored = _quadrants()
    out = np.asarray(open_rgb(_with_orientation(stored, n, "PNG")))  # lossless: exact pixels
    assert np.array_equal(out, DISPLAYED[n](stored))


def test_a_sideways_phone_jpeg_is_upright_everywhere(tmp_path):
    """A JPEG stored 64 x 40 with orientation 6 (shown 40 x 64): training, inpaint.py, its mask, evaluation and
    make_shards all see the displayed picture, and a mask painted on it fits without resizing."""
    stored = _quadrants()
    expected = DISPLAYED[6](stored)  # 64 high, 40 wide; red (top-left when stored) is now top-right
    data = _with_orientation(stored, 6, "JPEG")
    assert Image.open(io.BytesIO(data)).size == (64, 40)
    photo = tmp_path / "phone.jpg"
    photo.write_bytes(data)
    for name, pixels in [("training", np.asarray(decode_image(data))), ("inpaint.py", load_rgb(photo))]:
        assert pixels.shape == (64, 40, 3), name
        _assert_jpeg_close(pixels, expected)
    seen = []
    planned = open_rgb(data, plan=lambda w, h: seen.append((w, h)) or [(w, h)], draft=True)
    assert seen == [(40, 64)] and planned.size == (40, 64)  # resize plans are made for the displayed size
    hole = np.zeros((64, 40), np.uint8)
    hole[:20, :10] = 255  # painted on the displayed photo (PNG mask from an editor that kept the tag)
    mask_file = tmp_path / "phone_mask.png"
    mask_file.write_bytes(_with_orientation(DISPLAYED[8](hole[..., None])[..., 0], 6, "PNG"))  # stored sideways
    assert np.array_equal(load_mask(mask_file, size=(40, 64)), hole / 255.0)  # fits: no resize, no warning
    evaluation = load_folder(tmp_path, 40)
    assert evaluation[0].image.shape == (40, 40, 3)  # short side 40: crop the middle 40 of the 64 rows
    _assert_jpeg_close(evaluation[0].image, expected[12:52])
    (tmp_path / "phone.txt").write_text("a phone photo")
    make_shards = load_script("make_shards")
    record = next(make_shards.folder_records([(photo, "a phone photo", {})], tmp_path, make_shards.Skips(True)))
    assert record.image.size == (40, 64)


# ---------------------------------------------------------------------------------------------- user masks
def _hole() -> np.ndarray:
    hole = np.zeros((32, 40), bool)
    hole[8:20, 10:30] = True
    return hole


def _rgba(colour_hole, colour_rest, alpha_hole, alpha_rest) -> Image.Image:
    arr = np.empty((32, 40, 4), np.uint8)
    arr[_hole()] = (*colour_hole, alpha_hole)
    arr[~_hole()] = (*colour_rest, alpha_rest)
    return Image.fromarray(arr)


MASKS = {  # the same visible hole, saved the ways image editors and canvases save it
    "grey opaque": Image.fromarray(np.where(_hole(), 255, 0).astype(np.uint8)),
    "RGB opaque": Image.fromarray(np.stack([np.where(_hole(), 255, 0).astype(np.uint8)] * 3, -1)),
    "RGBA opaque": _rgba((255, 255, 255), (0, 0, 0), 255, 255),
    "RGBA white hole on transparent (hidden white)": _rgba((255, 255, 255), (255, 255, 255), 255, 0),
    "RGBA white hole on transparent (hidden garbage)": _rgba((255, 255, 255), (200, 10, 99), 255, 0),
    "RGBA alpha-painted in black": _rgba((0, 0, 0), (0, 0, 0), 255, 0),
    "RGBA alpha-painted, hidden white": _rgba((0, 0, 0), (255, 255, 255), 255, 0),
    "LA alpha-painted": Image.fromarray(np.stack([np.zeros((32, 40), np.uint8),
                                                  np.where(_hole(), 255, 0).astype(np.uint8)], -1), "LA"),
    # an opaque white-on-black mask whose background got alpha 254 (anti-aliasing, a soft brush): the old
    # "any alpha < 255 -> use alpha" rule turned this into an almost full-image hole
    "RGBA nearly opaque background": _rgba((255, 255, 255), (0, 0, 0), 255, 254),
    # partly transparent: white hole, opaque black keep area, and a transparent margin that must stay kept
    "RGBA partly transparent margin": None,
}


def _partly_transparent() -> Image.Image:
    img = np.asarray(_rgba((255, 255, 255), (0, 0, 0), 255, 255)).copy()
    img[:, :4, 3] = 0  # transparent left margin (outside the hole)
    img[:, :4, :3] = 255  # with white hidden colour
    return Image.fromarray(img)


@pytest.mark.parametrize("name", list(MASKS))
def test_the_same_visible_hole_gives_the_same_mask(name, tmp_path):
    img = MASKS[name] if MASKS[name] is not None else _partly_transparent()
    path = tmp_path / "mask.png"
    img.save(path)
    mask = load_mask(path)
    assert mask.shape == (32, 40) and mask.dtype == np.float32
    assert np.array_equal(mask >= 0.5, _hole()), name


def test_semi_transparent_paint_gives_soft_values():
    soft = mask_from_image(_rgba((255, 255, 255), (0, 0, 0), 128, 255))  # white hole painted at 50 % alpha
    assert soft[_hole()].max() == pytest.approx(128 / 255) and soft[~_hole()].max() == 0.0


def test_a_mask_of_another_size_is_resized_nearest_with_a_warning(tmp_path, caplog):
    path = tmp_path / "m.png"
    Image.fromarray(np.where(_hole(), 255, 0).astype(np.uint8)).save(path)
    with caplog.at_level(logging.WARNING):
        mask = load_mask(path, size=(80, 64))  # (width, height), twice the mask
    assert mask.shape == (64, 80) and set(np.unique(mask).tolist()) == {0.0, 1.0}  # nearest: still binary
    assert np.array_equal(mask[::2, ::2] >= 0.5, _hole())
    assert any("resizing the mask" in r.getMessage() and "40x32" in r.getMessage() for r in caplog.records)
    caplog.clear()
    load_mask(path, size=(40, 32))
    assert not caplog.records
    load_mask(path, size=(121, 97))  # 3x, with a pixel of rounding: the same aspect ratio
    load_mask(path, size=(4000, 3300))  # drawn on a 1/100 copy of a 4000 x 3300 photo: 40 x 33, off by one
    for other in ((32, 40), (40, 40), (80, 32)):  # rotated, square, twice as wide: the hole would move
        with pytest.raises(ValueError, match=f"m.png is 40x32 but its image is {other[0]}x{other[1]}"):
            load_mask(path, size=other)


def test_sixteen_bit_masks_follow_the_image_rule(tmp_path):
    path = tmp_path / "m16.png"
    Image.fromarray(np.where(_hole(), 65535, 0).astype(np.uint16)).save(path)
    assert np.array_equal(load_mask(path) >= 0.5, _hole())


def test_an_image_over_pils_pixel_limit_is_a_value_error_not_a_traceback(tmp_path, monkeypatch):
    # PIL refuses a file over twice MAX_IMAGE_PIXELS (a decompression bomb) with its own exception class, which
    # is not an OSError; the readers must turn it into their one-line ValueError like any unreadable file
    from ldm.image_io import load_mask, load_rgb

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "i.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels: over twice the limit
    with pytest.raises(ValueError, match=r"mask file .*m.png is not a readable image \(Image size"):
        load_mask(tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"image file .*i.png is not a readable image \(Image size"):
        load_rgb(tmp_path / "i.png")
