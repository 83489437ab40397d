"""Hostile and broken input, table-driven. Every request gets a clear 4xx with a reason,
or is accepted and then classified or failed with a cause: never a 500, never a stored
object without a row, never a row without its object."""

import io
import struct
import zlib

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image as PILImage
from rest_framework.test import APIClient

from diagnostics import services, storage
from diagnostics.models import Case, Image, Status
from tests.dicoms import bundled
from tests.factories import UserFactory, token_for
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]


def encode(image: PILImage.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_with_bad_crc() -> bytes:
    data = bytearray(image_bytes(64, 64, format="PNG"))
    ihdr_crc = 8 + 8 + 13  # signature, IHDR length+type, IHDR data
    data[ihdr_crc : ihdr_crc + 4] = b"\0\0\0\0"
    return bytes(data)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image, with a tiny compressed body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: (  # noqa: E731
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    )
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def animated(format: str) -> bytes:
    frames = [PILImage.new("RGB", (64, 64), color) for color in ("red", "blue")]
    return encode(frames[0], format, save_all=True, append_images=frames[1:], duration=100)


def multipage_tiff() -> bytes:
    pages = [PILImage.new("L", (64, 64), value) for value in (0, 255)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def polyglot_jpeg_html() -> bytes:
    return image_bytes(64, 64) + b"<html><script>alert(1)</script></html>PK\x03\x04"


SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64"/></svg>'
)
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF"
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
DICOM = b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00"

# (id, file name, bytes, declared content type, expected status, expected "detail" start)
REFUSED_FILES = [
    (
        "text-renamed-jpg",
        "scan.jpg",
        b"hello, I am text",
        "image/jpeg",
        400,
        "'scan.jpg' is not a readable image",
    ),
    ("zero-bytes", "empty.jpg", b"", "image/jpeg", 400, "'empty.jpg' is empty"),
    (
        "truncated-jpeg",
        "cut.jpg",
        image_bytes(128, 128)[:400],
        "image/jpeg",
        400,
        "'cut.jpg' could not be decoded",
    ),
    ("png-bad-crc", "crc.png", png_with_bad_crc(), "image/png", 400, "'crc.png' "),
    (
        "decompression-bomb",
        "bomb.png",
        png_header_only(20000, 20000),
        "image/png",
        413,
        "'bomb.png' is too large to decode",
    ),
    (
        "over-pixel-limit",
        "big.png",
        png_header_only(8000, 8000),
        "image/png",
        413,
        "'big.png' is 8000x8000 pixels; the limit is 36000000 pixels",
    ),
    (
        "one-pixel",
        "dot.png",
        image_bytes(1, 1, format="PNG"),
        "image/png",
        400,
        "'dot.png' is 1x1 pixels; each side must be at least 32",
    ),
    (
        "animated-gif",
        "anim.gif",
        animated("GIF"),
        "image/gif",
        400,
        "'anim.gif' is GIF; accepted formats are",
    ),
    (
        "animated-png",
        "anim.png",
        animated("PNG"),
        "image/png",
        400,
        "'anim.png' has several frames; upload one slice per file",
    ),
    (
        "animated-webp",
        "anim.webp",
        animated("WEBP"),
        "image/webp",
        400,
        "'anim.webp' has several frames",
    ),
    (
        "multipage-tiff",
        "pages.tif",
        multipage_tiff(),
        "image/tiff",
        400,
        "'pages.tif' has several frames",
    ),
    ("heic", "photo.heic", HEIC, "image/heic", 400, "'photo.heic' is not a readable image"),
    ("svg", "vector.svg", SVG, "image/svg+xml", 400, "'vector.svg' is not a readable image"),
    ("pdf", "report.pdf", PDF, "application/pdf", 400, "'report.pdf' is not a readable image"),
    # DICOM is recognised by its content and refused with a DICOM reason (diagnostics.dicom).
    (
        "dicom-header-only",
        "slice.dcm",
        DICOM,
        "application/dicom",
        400,
        "'slice.dcm' is a DICOM file without a modality; only MR slices are accepted",
    ),
    (
        "dicom-unknown-value-representation",
        "slice.dcm",
        bundled("MR_small.dcm").replace(b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00XX", 1),
        "application/dicom",
        400,
        "'slice.dcm' is not a readable DICOM file (NotImplementedError)",
    ),
    (
        "dicom-ct",
        "head.dcm",
        bundled("CT_small.dcm"),
        "application/dicom",
        400,
        "'head.dcm' is a CT DICOM; only MR slices are accepted",
    ),
    (
        "dicom-truncated-pixels",
        "cut.dcm",
        bundled("MR_truncated.dcm"),
        "application/octet-stream",
        400,
        "'cut.dcm': the DICOM pixel data could not be decoded",
    ),
    (
        "ico",
        "favicon.ico",
        encode(PILImage.new("RGB", (64, 64)), "ICO"),
        "image/x-icon",
        400,
        "'favicon.ico' is ICO; accepted formats are",
    ),
]


@pytest.fixture
def client():
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(UserFactory())}")
    return api


@pytest.mark.parametrize(
    ("name", "data", "content_type", "status", "detail"),
    [case[1:] for case in REFUSED_FILES],
    ids=[case[0] for case in REFUSED_FILES],
)
def test_broken_or_foreign_files_are_refused_with_a_reason(
    client, s3_keys, name, data, content_type, status, detail
):
    upload = SimpleUploadedFile(name, data, content_type=content_type)

    response = client.post("/api/v1/cases/", {"images": [upload]})

    assert response.status_code == status, response.content
    assert response.json()["detail"].startswith(detail)
    assert Case.objects.count() == 0
    assert s3_keys() == []


ACCEPTED_FILES = [
    ("grayscale-jpeg", "g.jpg", image_bytes(64, 64, mode="L"), "image/jpeg"),
    ("png-16-bit", "deep.png", encode(PILImage.new("I;16", (64, 64), 40000), "PNG"), "image/png"),
    ("palette-png", "pal.png", encode(PILImage.new("P", (64, 64), 3), "PNG"), "image/png"),
    ("gray-alpha-png", "la.png", encode(PILImage.new("LA", (64, 64)), "PNG"), "image/png"),
    (
        "cmyk-jpeg",
        "cmyk.jpg",
        encode(PILImage.new("CMYK", (64, 64), (0, 50, 100, 0)), "JPEG"),
        "image/jpeg",
    ),
    ("float-tiff", "f.tif", encode(PILImage.new("F", (64, 64), 0.5), "TIFF"), "image/tiff"),
    ("bmp", "b.bmp", image_bytes(64, 64, format="BMP"), "image/bmp"),
    ("webp", "w.webp", image_bytes(64, 64, format="WEBP"), "image/webp"),
    ("declared-type-lies", "x.png", image_bytes(64, 64), "application/octet-stream"),
    ("path-traversal-name", "../../../etc/passwd", image_bytes(64, 64), "image/jpeg"),
    ("unicode-name", "Ωmega_脑_🧠.jpg", image_bytes(64, 64), "image/jpeg"),
    ("very-long-name", "a" * 1000 + ".jpg", image_bytes(64, 64), "image/jpeg"),
    ("polyglot-jpeg-html-zip", "poly.jpg", polyglot_jpeg_html(), "text/html"),
]


@pytest.mark.parametrize(
    ("name", "data", "content_type"),
    [case[1:] for case in ACCEPTED_FILES],
    ids=[case[0] for case in ACCEPTED_FILES],
)
def test_odd_but_real_images_are_accepted_then_classified_or_failed_with_a_cause(
    client, s3_keys, tiny_classifier, name, data, content_type
):
    upload = SimpleUploadedFile(name, data, content_type=content_type)

    response = client.post("/api/v1/cases/", {"images": [upload]})

    assert response.status_code == 202, response.content
    image = Image.objects.get()
    # The key is the server's, the type is what the bytes decode as, the name is display-only.
    assert image.s3_key == f"scans/{image.case_id}/{image.id}"
    assert s3_keys() == [image.s3_key]
    assert storage.get(image.s3_key) == data
    assert image.content_type == PILImage.MIME[PILImage.open(io.BytesIO(data)).format]
    assert len(image.original_name) <= 255

    services.image_classify(image_id=image.id, classifier=tiny_classifier)

    image.refresh_from_db()
    # Synthetic images like these may well be refused as not brain MRI slices.
    assert image.status in (Status.DONE, Status.FAILED, Status.REJECTED)
    if image.status == Status.FAILED:
        assert image.error.startswith("the model could not read")
    if image.status == Status.REJECTED:
        assert image.error.startswith("not a brain MRI slice")


def test_a_thousand_files_in_one_request_are_refused(client, s3_keys):
    files = [SimpleUploadedFile(f"{i}.jpg", b"x", content_type="image/jpeg") for i in range(1000)]
    response = client.post("/api/v1/cases/", {"images": files})
    assert response.status_code == 400
    assert response.json() == {
        "detail": "too many files in one request; the limit is 64",
        "code": "too_many_files",
    }
    assert s3_keys() == []


def test_no_body_at_all(client):
    response = client.post("/api/v1/cases/")
    assert response.status_code == 400
    assert response.json()["detail"] == "no images: send one or more files in the 'images' field"


def test_files_under_the_wrong_field_name(client):
    response = client.post(
        "/api/v1/cases/", {"image": [SimpleUploadedFile("a.jpg", image_bytes())]}
    )
    assert response.status_code == 400
    assert response.json()["detail"] == "no images: send one or more files in the 'images' field"


def test_multipart_whose_parts_do_not_match_its_boundary(client):
    response = client.generic(
        "POST",
        "/api/v1/cases/",
        b'--nope\r\nContent-Disposition: form-data; name="images"\r\n\r\ngarbage',
        content_type="multipart/form-data; boundary=other",
    )
    assert response.status_code == 400
    assert response.json()["detail"] == "no images: send one or more files in the 'images' field"


def test_multipart_without_boundary(client):
    response = client.generic("POST", "/api/v1/cases/", b"x", content_type="multipart/form-data")
    assert response.status_code == 400
    assert "boundary" in response.json()["detail"].lower()


def test_huge_json_body(client):
    body = b'{"reference": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    response = client.generic("POST", "/api/v1/cases/", body, content_type="application/json")
    assert response.status_code == 413
    assert response.json() == {
        "detail": "the request body is larger than the server accepts",
        "code": "too_large",
    }


def test_json_instead_of_files(client):
    response = client.post("/api/v1/cases/", {"images": "aGVsbG8="}, format="json")
    assert response.status_code == 400
    assert response.json()["detail"] == "no images: send one or more files in the 'images' field"


def test_unsupported_body_type(client):
    response = client.generic("POST", "/api/v1/cases/", b"hello", content_type="text/plain")
    assert response.status_code == 415
    assert response.json() == {"detail": 'Unsupported media type "text/plain" in request.'}


def test_too_long_reference(client):
    response = client.post(
        "/api/v1/cases/",
        {"images": [SimpleUploadedFile("a.jpg", image_bytes())], "reference": "r" * 129},
    )
    assert response.status_code == 400
    assert response.json() == {"reference": ["Ensure this field has no more than 128 characters."]}


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/cases/not-a-uuid/",
        "/api/v1/cases/1' OR '1'='1/",
        "/api/v1/cases/00000000-0000-0000-0000-00000000000g/",
        "/api/v1/cases/%00/",
    ],
)
def test_invalid_case_ids_are_not_found(client, path):
    response = client.get(path)
    assert response.status_code == 404


@pytest.mark.parametrize(
    "query",
    [
        {"status": "done' OR 1=1 --"},
        {"status": "done; DROP TABLE diagnostics_case"},
        {"status": "\x00"},
    ],
)
def test_sql_ish_filters_are_refused(client, query):
    response = client.get("/api/v1/cases/", query)
    assert response.status_code == 400
    assert list(response.json()) == ["status"]


@pytest.mark.parametrize("page_size", ["-1", "0", "abc", "100000000000000000000"])
def test_odd_page_sizes_fall_back_to_the_default(client, page_size):
    response = client.get("/api/v1/cases/", {"page_size": page_size})
    assert response.status_code == 200


def test_a_forged_cursor_is_refused(client):
    response = client.get("/api/v1/cases/", {"cursor": "'; DROP TABLE x; --"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Invalid cursor"}
