"""Validate an uploaded slice by decoding it (Pillow, or pydicom for DICOM files); the file
name and the declared content type are never trusted."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

from django.conf import settings
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from diagnostics.errors import InvalidUpload, UploadTooLarge

if TYPE_CHECKING:
    from diagnostics.dicom import DicomSlice

# Formats the model's loader decodes the same way as here.
ACCEPTED_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP"}


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    sha256: str
    content_type: str
    width: int
    height: int
    original_name: str
    # Set for a DICOM upload: then `data` is the de-identified file, `original_name` a
    # neutral name (the uploaded one may carry the patient's), and this has the rest.
    dicom: DicomSlice | None = None


def check_image(data: bytes, original_name: str, *, pseudonym_scope: str = "") -> CheckedImage:
    """Decode the upload and return what may be stored. A DICOM file (recognised by its
    content) is checked, rendered and de-identified here, before anything is stored;
    `pseudonym_scope` (the site) keys its pseudonymous UIDs."""
    label = f"'{original_name}'" if original_name else "the file"
    if not data:
        raise InvalidUpload(f"{label} is empty")
    if len(data) > settings.MAX_IMAGE_BYTES:
        raise UploadTooLarge(
            f"{label} is {len(data)} bytes; the limit is {settings.MAX_IMAGE_BYTES} bytes"
        )
    # Imported on first use: pydicom and its codecs take 0.2 s to import, which would slow
    # the cold start of every worker (they never read an upload); web processes import it
    # when they start (diagnostics.wsgi).
    from diagnostics import dicom

    if dicom.is_dicom(data):
        return _checked_dicom(data, label=label, pseudonym_scope=pseudonym_scope)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(BytesIO(data)) as image:
                image_format = image.format
                width, height = image.size
                if image_format not in ACCEPTED_FORMATS:
                    raise InvalidUpload(
                        f"{label} is {image_format}; accepted formats are "
                        f"{', '.join(sorted(ACCEPTED_FORMATS))}"
                    )
                if width * height > settings.MAX_IMAGE_PIXELS:
                    raise UploadTooLarge(
                        f"{label} is {width}x{height} pixels; the limit is "
                        f"{settings.MAX_IMAGE_PIXELS} pixels"
                    )
                if min(width, height) < settings.MIN_IMAGE_SIDE:
                    raise InvalidUpload(
                        f"{label} is {width}x{height} pixels; each side must be at least "
                        f"{settings.MIN_IMAGE_SIDE}"
                    )
                if getattr(image, "n_frames", 1) > 1:
                    raise InvalidUpload(f"{label} has several frames; upload one slice per file")
                # Decode the whole file: a truncated or corrupt one fails here, not in the
                # worker. A JPEG is decoded at 1/8 scale (libjpeg reads every block, skipping
                # most of the inverse DCT): the same check at a fraction of the CPU.
                if image_format == "JPEG":
                    image.draft(image.mode, (max(width // 8, 1), max(height // 8, 1)))
                image.load()
    except (UploadTooLarge, InvalidUpload):
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise UploadTooLarge(f"{label} is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidUpload(f"{label} is not a readable image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidUpload(f"{label} could not be decoded: {exc}") from exc
    return CheckedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=PILImage.MIME[image_format],
        width=width,
        height=height,
        original_name=original_name,
    )


def _checked_dicom(data: bytes, *, label: str, pseudonym_scope: str) -> CheckedImage:
    from diagnostics import dicom

    slice_ = dicom.read_slice(data, label=label, pseudonym_scope=pseudonym_scope)
    return CheckedImage(
        data=slice_.data,
        sha256=hashlib.sha256(slice_.data).hexdigest(),
        content_type=dicom.CONTENT_TYPE,
        width=slice_.width,
        height=slice_.height,
        original_name=slice_.display_name,
        dicom=slice_,
    )


def read_upload(upload) -> tuple[str, bytes]:
    """(name, bytes) of an uploaded file, refusing an oversized one before reading it."""
    name = upload.name or ""
    if upload.size > settings.MAX_IMAGE_BYTES:
        raise UploadTooLarge(
            f"'{name}' is {upload.size} bytes; the limit is {settings.MAX_IMAGE_BYTES} bytes"
        )
    return name, upload.read()
