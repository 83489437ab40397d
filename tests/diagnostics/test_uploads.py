import pytest
from PIL import Image

from diagnostics.errors import InvalidUpload, UploadTooLarge
from diagnostics.uploads import check_image
from tests.images import image_bytes


def test_a_jpeg_is_described_by_its_decoded_content():
    data = image_bytes(80, 60)
    checked = check_image(data, "slice.png")  # the name lies; the content decides
    assert (checked.content_type, checked.width, checked.height) == ("image/jpeg", 80, 60)
    assert len(checked.sha256) == 64


def test_grayscale_png_is_accepted():
    checked = check_image(image_bytes(40, 40, format="PNG", mode="L"), "a.png")
    assert checked.content_type == "image/png"


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidUpload, "'x.jpg' is empty"),
        (b"just some text", InvalidUpload, "'x.jpg' is not a readable image"),
        (image_bytes(64, 64)[:300], InvalidUpload, "'x.jpg' could not be decoded: "),
        (image_bytes(8, 8), InvalidUpload, "'x.jpg' is 8x8 pixels; each side must be at least 32"),
        (
            image_bytes(64, 64, format="GIF", mode="L"),
            InvalidUpload,
            "'x.jpg' is GIF; accepted formats are BMP, JPEG, PNG, TIFF, WEBP",
        ),
    ],
    ids=["empty", "text", "truncated", "tiny", "gif"],
)
def test_undecodable_or_unsuitable_files_are_refused_with_a_reason(data, error, message):
    with pytest.raises(error) as refused:
        check_image(data, "x.jpg")
    assert refused.value.detail.startswith(message)


def test_more_pixels_than_the_limit_is_refused_before_decoding(settings):
    settings.MAX_IMAGE_PIXELS = 100 * 100
    with pytest.raises(UploadTooLarge) as refused:
        check_image(image_bytes(200, 100, format="PNG"), "big.png")
    assert refused.value.detail == "'big.png' is 200x100 pixels; the limit is 10000 pixels"


def test_decompression_bomb_header_is_refused(tmp_path):
    # A 20000x20000 PNG compresses to a few hundred KB but decodes to 1.2 GB.
    path = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(path, optimize=False)
    with pytest.raises(UploadTooLarge) as refused:
        check_image(path.read_bytes(), "bomb.png")
    assert refused.value.detail.startswith("'bomb.png' is too large to decode: Image size")


def test_more_bytes_than_the_limit_is_refused(settings):
    settings.MAX_IMAGE_BYTES = 100
    with pytest.raises(UploadTooLarge) as refused:
        check_image(image_bytes(64, 64), "x.jpg")
    assert refused.value.detail.endswith("bytes; the limit is 100 bytes")


@pytest.mark.parametrize("kept", [0.5, 0.9, 0.99])
def test_a_jpeg_cut_anywhere_in_its_pixel_data_is_refused(kept):
    # Uploads decode a JPEG at reduced scale; every block is still read, so a file that
    # ends early is refused whatever part of the image it loses.
    data = image_bytes(512, 512, seed=3)
    with pytest.raises(InvalidUpload) as refused:
        check_image(data[: int(len(data) * kept)], "cut.jpg")
    assert refused.value.detail.startswith("'cut.jpg' could not be decoded: ")
