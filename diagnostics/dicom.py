"""DICOM slices: read and check an upload, render it to 8-bit for the model, and de-identify
it before any byte of it is stored.

De-identification follows the DICOM PS3.15 Annex E Basic Application Level Confidentiality
Profile through `dicom-anonymizer` (KitwareMedical), whose action table is generated from
the standard's own table (edition 2026c): every listed attribute is removed, emptied or
replaced (names, IDs, birth date, sex, age, addresses, institution, physicians, accession
number, dates and times, descriptions and comments, overlays and curves), and private tags
are removed. (dicognito replaces a fixed list of identifying elements with plausible fakes
but leaves descriptions, comments and private tags; deid's default recipe is a hand-kept
list, not the standard's table.) We add on top of it:

- UIDs are not random but keyed hashes (HMAC-SHA256 with DICOM_PSEUDONYM_KEY) of the original
  UID and the site, so the slices of one study, uploaded in any number of requests, keep one
  pseudonymous StudyInstanceUID (the case's study reference), while the same study at two
  sites never maps to the same value, and nobody without the key can recompute them;
- the profile's actions run inside every nested sequence item too (the library applies them
  to the top level only);
- the file meta header is rebuilt from scratch, and the 128-byte preamble zeroed;
- BurnedInAnnotation YES is refused: pixels with text in them cannot be cleaned here.

pydicom logs some element values when it warns about them (an invalid date, say), so its
logger is kept out of the application's logs.
"""

import hashlib
import hmac
import io
import logging
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from dicomanonymizer import simpledicomanonymizer
from django.conf import settings
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.sequence import Sequence

from diagnostics.errors import InvalidUpload, UploadTooLarge

# Element values can appear in pydicom's warnings: they must never reach a log.
logging.getLogger("pydicom").propagate = False
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)

CONTENT_TYPE = "application/dicom"
ACCEPTED_MODALITY = "MR"
PROFILE_EDITION = "dicomfields_2026c"
# At most 64 characters (VR LO).
DEIDENTIFICATION_METHOD = "PS3.15 E.1 Basic Profile, keyed-hash UIDs (dicom-anonymizer)"
# The part 10 file's magic: 128 bytes of preamble, then "DICM".
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"


def is_dicom(data: bytes) -> bool:
    """A DICOM part 10 file, recognised by its content, never by its name."""
    return data[_MAGIC_OFFSET : _MAGIC_OFFSET + len(_MAGIC)] == _MAGIC


@dataclass(frozen=True)
class DicomSlice:
    """One de-identified MR slice, ready to store."""

    # The de-identified part 10 file, with the original (possibly compressed) pixel data.
    data: bytes
    # 8-bit grayscale PNG of the windowed pixels: what the model and the admin see.
    rendering: bytes
    width: int
    height: int
    # Pseudonymous UIDs (keyed hashes of the originals and the site).
    study_uid: str
    series_uid: str
    instance_uid: str
    # Numbers of the series and the slice in it (no patient data), for a neutral file name.
    series_number: str
    instance_number: str

    @property
    def display_name(self) -> str:
        """A file name that says which slice it is without anything the client named it
        (uploaded DICOM names often carry the patient's name)."""
        return f"MR series {self.series_number or '?'} image {self.instance_number or '?'}.dcm"


def read_slice(data: bytes, *, label: str, pseudonym_scope: str) -> DicomSlice:
    """Check a DICOM upload, render it to 8-bit and de-identify it.

    `label` names the upload in error messages; `pseudonym_scope` (the site) keys the
    pseudonymous UIDs. Raises InvalidUpload or UploadTooLarge with the reason.
    """
    with warnings.catch_warnings():
        # pydicom warns with element values in the message; they stay out of stderr too.
        warnings.simplefilter("ignore")
        dataset = _parse(data, label=label)
        _check(dataset, label=label)
        rendering = _render(dataset, label=label)
        return _deidentify(dataset, rendering=rendering, scope=pseudonym_scope)


def _parse(data: bytes, *, label: str) -> Dataset:
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        # Elements are parsed lazily: touch each one now, so a malformed header fails here.
        dataset.walk(lambda _dataset, _element: None)
    except Exception as exc:
        # Hostile or broken files raise anything from EOFError to struct.error. The
        # exception text is left out: it can quote element values, which may be patient data.
        raise InvalidUpload(
            f"{label} is not a readable DICOM file ({type(exc).__name__})"
        ) from None
    return dataset


def _check(dataset: Dataset, *, label: str) -> None:
    modality = str(dataset.get("Modality") or "").strip()
    if not modality:
        raise InvalidUpload(
            f"{label} is a DICOM file without a modality; only MR slices are accepted"
        )
    if modality != ACCEPTED_MODALITY:
        raise InvalidUpload(f"{label} is a {modality} DICOM; only MR slices are accepted")
    if "PixelData" not in dataset:
        raise InvalidUpload(f"{label} is a DICOM file without pixel data")
    frames = _int(dataset.get("NumberOfFrames"), default=1)
    if frames > 1:
        raise InvalidUpload(
            f"{label} is a multi-frame DICOM ({frames} frames); upload one slice per file"
        )
    if str(dataset.get("BurnedInAnnotation") or "").strip().upper() == "YES":
        raise InvalidUpload(
            f"{label} has burned-in annotation (BurnedInAnnotation YES): text in the pixels "
            "may identify the patient, so it is not accepted"
        )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not str(dataset.get(keyword) or "").strip():
            raise InvalidUpload(f"{label} is a DICOM file without a {keyword}")
    samples = _int(dataset.get("SamplesPerPixel"), default=1)
    photometric = str(dataset.get("PhotometricInterpretation") or "").strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidUpload(
            f"{label} is a {photometric or 'colour'} DICOM image; only grayscale "
            "(MONOCHROME1/MONOCHROME2) MR slices are accepted"
        )
    width, height = _int(dataset.get("Columns"), 0), _int(dataset.get("Rows"), 0)
    if width * height > settings.MAX_IMAGE_PIXELS:
        raise UploadTooLarge(
            f"{label} is {width}x{height} pixels; the limit is {settings.MAX_IMAGE_PIXELS} pixels"
        )
    if min(width, height) < settings.MIN_IMAGE_SIDE:
        raise InvalidUpload(
            f"{label} is {width}x{height} pixels; each side must be at least "
            f"{settings.MIN_IMAGE_SIDE}"
        )
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise InvalidUpload(f"{label} is a DICOM file without a transfer syntax")
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:
        decodable = False
    if not decodable:
        raise InvalidUpload(
            f"{label} uses the transfer syntax {syntax.name} ({syntax}), which this server "
            "cannot decode; send it uncompressed or as JPEG, JPEG-LS, JPEG 2000 or RLE"
        )


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _render(dataset: Dataset, *, label: str) -> bytes:
    """The slice as an 8-bit grayscale PNG: modality LUT (rescale slope/intercept), then the
    file's first window (center/width), or the pixels' min..max when it has none;
    MONOCHROME1 is inverted so that bright means the same as in every other upload."""
    try:
        pixels = dataset.pixel_array
    except Exception as exc:
        raise InvalidUpload(f"{label}: the DICOM pixel data could not be decoded ({exc})") from None
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    low, high = _window(dataset, values)
    if high > low:
        scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    else:
        scaled = np.zeros_like(values)
    if str(dataset.PhotometricInterpretation).strip() == "MONOCHROME1":
        scaled = 1.0 - scaled
    out = io.BytesIO()
    PILImage.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def _window(dataset: Dataset, values: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) value shown, from the first WindowCenter/WindowWidth (DICOM's linear
    VOI function, PS3.3 C.11.2.1.2), else the pixels' own range."""
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if width >= 1:
            return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    return float(values.min()), float(values.max())


# --- De-identification -------------------------------------------------------------------


def pseudonymous_uid(original: str, *, scope: str) -> str:
    """The UID that replaces `original` at `scope` (a site): the same input gives the same
    UID, another site or another key a different one. A 2.25 UID (a UUID as an integer)."""
    digest = hmac.new(
        settings.DICOM_PSEUDONYM_KEY.encode(),
        f"{scope}\x00{original.strip()}".encode(),
        hashlib.sha256,
    ).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def _deidentify(dataset: Dataset, *, rendering: bytes, scope: str) -> DicomSlice:
    _apply_basic_profile(dataset, scope=scope)
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    dataset.DeidentificationMethodCodeSequence = Sequence([code])
    dataset.LongitudinalTemporalInformationModified = "REMOVED"

    # A fresh meta header: the original's may name the sending application or station.
    old_meta = dataset.file_meta
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = old_meta.TransferSyntaxUID
    dataset.file_meta = meta
    dataset.preamble = b"\x00" * _MAGIC_OFFSET
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return DicomSlice(
        data=out.getvalue(),
        rendering=rendering,
        width=int(dataset.Columns),
        height=int(dataset.Rows),
        study_uid=str(dataset.StudyInstanceUID),
        series_uid=str(dataset.SeriesInstanceUID),
        instance_uid=str(dataset.SOPInstanceUID),
        series_number=_number(dataset.get("SeriesNumber")),
        instance_number=_number(dataset.get("InstanceNumber")),
    )


def _number(value) -> str:
    number = _int(value, default=-1)
    return str(number) if number >= 0 else ""


def _apply_basic_profile(dataset: Dataset, *, scope: str) -> None:
    actions = simpledicomanonymizer.initialize_actions(PROFILE_EDITION)
    replace_uid = _uid_replacer(scope)
    uid_actions = {
        tag: replace_uid
        for tag, action in actions.items()
        if len(tag) == 2
        and action is not simpledicomanonymizer.delete
        and pydicom.datadict.dictionary_has_tag(tag)
        and pydicom.datadict.dictionary_VR(tag) == "UI"
    }
    try:
        _anonymize_recursively(dataset, {**actions, **uid_actions})
    finally:
        # The library caches the random UIDs it makes in a module-level dict; ours are
        # derived instead, and nothing may pile up there across uploads.
        simpledicomanonymizer.dictionary.clear()


def _anonymize_recursively(dataset: Dataset, actions: dict) -> None:
    simpledicomanonymizer.anonymize_dataset(
        dataset,
        extra_anonymization_rules=None,
        delete_private_tags=True,
        base_rules_gen=lambda: dict(actions),
    )
    for element in list(dataset):
        if element.VR == "SQ" and element.value:
            for item in element.value:
                _anonymize_recursively(item, actions)


def _uid_replacer(scope: str):
    def replace(dataset: Dataset, tag) -> None:
        element = dataset.get(tag)
        if element is None or element.VR != "UI" or not element.value:
            return
        if isinstance(element.value, pydicom.multival.MultiValue):
            element.value = [pseudonymous_uid(str(uid), scope=scope) for uid in element.value]
        else:
            element.value = pseudonymous_uid(str(element.value), scope=scope)

    return replace
