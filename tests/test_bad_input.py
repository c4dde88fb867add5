"""A corpus of awkward input, written at test time: every image mode Pillow reads becomes the
8-bit RGB a user expects, EXIF orientation is applied, and what cannot be used is refused with
an exact message that starts with the file's path."""
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from pipeline.datasets.checks import BadInputError, check_records
from pipeline.datasets.folder import prepare_folder
from pipeline.params import DataParams, Params
from pipeline.prepare import prepare
from weclip.contract import ClassInfo, Record, read_manifest
from weclip.images import load_image, load_mask

INFO = ClassInfo(name="toy", classes=["cat", "dog"], prompts=["cat", "dog"], background=["grass"])


def user_folder(base, images: dict, csv: bytes = b"image,labels\na.png,cat\n"):
    """images/<name> written by each ``images`` function, labels.csv holding ``csv``."""
    (base / "images").mkdir()
    for name, write in images.items():
        write(base / "images" / name)
    (base / "labels.csv").write_bytes(csv)
    (base / "classes.txt").write_text("cat\ndog\n")
    return dict(images=base / "images", labels_csv=base / "labels.csv",
                classes=base / "classes.txt")


def rgb(path, size=(8, 6)):
    Image.new("RGB", size, (10, 20, 30)).save(path)


def sideways_photo(path):
    """A 64x32 JPEG, left half red, right half blue, whose EXIF orientation 6 says: turn it
    90 degrees clockwise to show it (a phone held upright), i.e. 32x64 with red on top."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32, 0] = 255
    pixels[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


# Images and their modes


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif")])
def test_a_16_bit_grayscale_image_is_scaled_not_clipped(tmp_path, mode, suffix):
    gradient = np.linspace(0, 65535, 16 * 16).round().reshape(16, 16)
    path = tmp_path / f"gradient{suffix}"
    Image.fromarray(gradient.astype(">u2" if mode == "I;16B" else np.uint16)).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    image = load_image(path)
    assert image.shape == (3, 16, 16) and (image[0] == image[1]).all()
    # Its type's range onto 0..255, as a viewer shows it: 65535 / 257 = 255.
    assert image[0].tolist() == np.round(gradient / 257).tolist()
    assert (image.min(), image.max()) == (0, 255)


@pytest.mark.parametrize("dtype, mode", [(np.float32, "F"), (np.int32, "I")])
def test_a_32_bit_tiff_is_stretched_over_its_own_range(tmp_path, dtype, mode):
    values = np.array([[-1000, 0], [1000, 3000]], dtype)
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    assert load_image(path)[0].tolist() == [[0, 64], [128, 255]]


def test_missing_values_of_a_float_image_are_black_and_do_not_spoil_its_range(tmp_path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.array([[np.nan, 2.0], [np.inf, 4.0]], np.float32)).save(path)
    assert load_image(path)[0].tolist() == [[0, 0], [0, 255]]


def test_a_constant_float_image_is_black(tmp_path):
    path = tmp_path / "flat.tif"
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(path)
    assert load_image(path).max() == 0


def palette(path):
    image = Image.new("P", (4, 4))
    image.putpalette([200, 50, 20])
    image.save(path, transparency=0)


def grey_with_alpha(path):
    Image.new("LA", (4, 4), (100, 30)).save(path)


def cmyk(path):
    Image.new("RGB", (4, 4), (200, 50, 20)).convert("CMYK").save(path, quality=100)


def rgba(path):
    Image.new("RGBA", (4, 4), (200, 50, 20, 0)).save(path)


@pytest.mark.parametrize("write, name, colour", [
    (palette, "palette.png", (200, 50, 20)),
    (grey_with_alpha, "la.png", (100, 100, 100)),
    (cmyk, "cmyk.jpg", (200, 50, 20)),
    (rgba, "rgba.png", (200, 50, 20)),  # the alpha is dropped, the colour kept
])
def test_palette_grey_alpha_cmyk_and_rgba_images_keep_their_colour(tmp_path, write, name, colour):
    write(tmp_path / name)
    image = load_image(tmp_path / name)
    assert image.shape == (3, 4, 4)
    assert (image - torch.tensor(colour)[:, None, None]).abs().max() <= 2  # JPEG's rounding


# EXIF orientation


def test_an_exif_rotated_photo_is_loaded_upright(tmp_path):
    sideways_photo(tmp_path / "phone.jpg")
    image = load_image(tmp_path / "phone.jpg")
    assert image.shape == (3, 64, 32)
    top, bottom = image[:, :24].mean((1, 2)), image[:, 40:].mean((1, 2))
    assert top[0] > 240 and top[2] < 15 and bottom[2] > 240 and bottom[0] < 15


def test_an_upright_mask_matches_its_exif_rotated_photo_in_prepare(tmp_path):
    folder = user_folder(tmp_path, {"phone.jpg": sideways_photo}, b"image,labels\nphone.jpg,cat\n")
    (tmp_path / "masks").mkdir()
    # Drawn on the photo as shown, saved without EXIF, as annotation tools do.
    Image.new("L", (32, 64), 1).save(tmp_path / "masks" / "phone.png")
    out = prepare_folder(tmp_path / "out", masks=tmp_path / "masks", **folder)
    assert read_manifest(out)[0].mask == (tmp_path / "masks" / "phone.png").resolve()


def test_a_mask_is_turned_by_its_own_exif_orientation_only(tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.new("L", (6, 4)).save(tmp_path / "kept_exif.png", exif=exif)
    Image.new("L", (6, 4)).save(tmp_path / "plain.png")
    assert load_mask(tmp_path / "kept_exif.png").shape == (6, 4)
    assert load_mask(tmp_path / "plain.png").shape == (4, 6)


# Files that are refused, each with its exact message


def test_an_image_over_max_pixels_is_refused_naming_its_size_and_the_parameter(tmp_path):
    folder = user_folder(tmp_path, {"a.png": rgb})
    params = Params(data=DataParams(dataset="folder", out=str(tmp_path / "out"), folder=folder,
                                    max_pixels=47))
    with pytest.raises(BadInputError) as error:
        prepare(params)
    assert str(error.value).splitlines()[:2] == [
        "1 problem(s) in the input:",
        f"  {tmp_path}/images/a.png: image is 8x6 = 48 pixels, over data.max_pixels = 47; "
        "shrink it or raise data.max_pixels"]
    params.data.max_pixels = 48
    assert read_manifest(prepare(params))[0].image_id == "a"


@pytest.mark.parametrize("name, write, problem", [
    ("text.jpg", lambda p: p.write_text("not an image"),
     "cannot decode image (UnidentifiedImageError: cannot identify image file '{path}')"),
    ("gone.jpg", lambda p: None, "image file not found"),
])
def test_an_unreadable_image_is_refused(tmp_path, name, write, problem):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as error:
        load_image(path)
    assert str(error.value) == f"{path}: " + problem.format(path=path)
    record = Record("x", path, None, "train", [1])
    assert check_records([record], INFO, workers=1)[1] == [(str(path),
                                                             problem.format(path=path))]


def test_a_mask_with_colour_channels_is_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "mask.png")
    with pytest.raises(ValueError) as error:
        load_mask(tmp_path / "mask.png")
    assert str(error.value) == (f"{tmp_path}/mask.png: mask has 3 channels (RGB); expected a "
                                "single-channel PNG of class ids")


# The labels CSV


def test_a_latin_1_labels_csv_is_refused_naming_the_file_and_line(tmp_path):
    csv = "image,labels\na.png,cat\ncafé.png,dog\n".encode("latin-1")
    folder = user_folder(tmp_path, {"a.png": rgb}, csv)
    with pytest.raises(ValueError) as error:
        prepare_folder(tmp_path / "out", **folder)
    assert str(error.value) == (f"{tmp_path}/labels.csv:3: not UTF-8 (byte 0xe9: invalid "
                                "continuation byte); save the file as UTF-8")


def test_a_utf_8_labels_csv_with_a_byte_order_mark_prepares(tmp_path):
    csv = "image,labels\ncafé.png,dog\n".encode("utf-8-sig")  # Excel's "CSV UTF-8"
    folder = user_folder(tmp_path, {"café.png": rgb}, csv)
    records = read_manifest(prepare_folder(tmp_path / "out", **folder))
    assert [(r.image_id, r.labels) for r in records] == [("café", [2])]
