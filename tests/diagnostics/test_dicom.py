"""diagnostics.dicom: which DICOM files are accepted, how they are rendered for the model,
and what de-identification leaves in them. No database or S3: the upload path is in
tests/diagnostics/api/test_dicom_upload.py."""

import io
import logging

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from diagnostics import dicom
from diagnostics.errors import InvalidUpload, UploadTooLarge
from diagnostics.uploads import check_image
from ml.data import decode_image
from tests.dicoms import bundled, mr_slice, phi_slice, to_bytes

SCOPE = "site:1"

# pydicom's own MR sample in every encoding its wheel ships, all the same 64x64 slice.
BUNDLED_MR = [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
]


def read(data: bytes, name: str = "slice.dcm", scope: str = SCOPE) -> dicom.DicomSlice:
    return dicom.read_slice(data, label=f"'{name}'", pseudonym_scope=scope)


def rendered(slice_: dicom.DicomSlice) -> np.ndarray:
    with PILImage.open(io.BytesIO(slice_.rendering)) as picture:
        assert (picture.format, picture.mode) == ("PNG", "L")
        return np.asarray(picture)


def reason(data: bytes, name: str = "slice.dcm") -> str:
    with pytest.raises((InvalidUpload, UploadTooLarge)) as refused:
        read(data, name)
    return refused.value.detail


# --- What is accepted ---------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED_MR)
def test_every_bundled_mr_encoding_is_accepted_and_renders_the_same_pixels(name):
    reference = rendered(read(bundled("MR_small.dcm")))

    slice_ = read(bundled(name), name)

    assert (slice_.width, slice_.height) == (64, 64)
    # Lossless encodings (uncompressed, RLE, JPEG 2000, JPEG-LS) decode to the same slice.
    assert np.array_equal(rendered(slice_), reference)
    # Its window (600 +- 800) shows detail and clips the brightest pixels (4000).
    assert len(np.unique(reference)) > 100 and reference.max() == 255


def test_the_original_pixel_data_is_kept_in_its_transfer_syntax():
    original = pydicom.dcmread(io.BytesIO(bundled("MR_small_jp2klossless.dcm")))

    stored = pydicom.dcmread(io.BytesIO(read(bundled("MR_small_jp2klossless.dcm")).data))

    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData


def test_check_image_recognises_dicom_by_content_whatever_the_name():
    checked = check_image(bundled("MR_small.dcm"), "scan.jpg", pseudonym_scope=SCOPE)

    assert checked.content_type == "application/dicom"
    assert checked.dicom is not None
    assert checked.data == checked.dicom.data  # the de-identified file, not the upload
    assert checked.original_name == "MR series 1 image 1.dcm"


def test_the_rendering_is_what_the_models_loader_reads_like_any_image():
    slice_ = read(bundled("MR_small.dcm"))

    pixels = decode_image(slice_.rendering, 32)

    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    # Grayscale: the three channels are equal.
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


# --- Windowing ----------------------------------------------------------------------------


def slice_with(values: list[int], **attributes) -> bytes:
    """A 32x32 slice whose first row starts with `values`, the rest 0."""
    dataset = mr_slice(side=32, **attributes)
    pixels = np.zeros((32, 32), dtype=np.uint16)
    pixels[0, : len(values)] = values
    dataset.PixelData = pixels.tobytes()
    return to_bytes(dataset)


def test_the_files_window_is_applied_after_rescale_slope_and_intercept():
    # Stored 0, 50, 100, 150 -> rescaled 2x - 100: -100, 0, 100, 200. Window 100 +- 100.
    data = slice_with(
        [0, 50, 100, 150],
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=100,
        WindowWidth=200,
    )

    row = rendered(read(data))[0, :4]

    # DICOM's linear window: 0.5 below the centre, (width - 1) wide; outside it clips.
    assert row.tolist() == [0, 0, 128, 255]


def test_the_first_of_several_windows_is_used():
    data = slice_with([0, 100, 200], WindowCenter=[100, 1000], WindowWidth=[200, 10])

    assert rendered(read(data))[0, :3].tolist() == [0, 128, 255]


def test_without_a_window_the_pixels_own_range_is_stretched_to_8_bits():
    data = slice_with([1000, 3000])  # the rest of the slice is 0

    assert rendered(read(data))[0, :3].tolist() == [85, 255, 0]


def test_monochrome1_is_inverted_so_bright_means_the_same():
    data = slice_with([1000, 3000], PhotometricInterpretation="MONOCHROME1")

    assert rendered(read(data))[0, :3].tolist() == [170, 0, 255]


# --- What is refused, and why ----------------------------------------------------------------


def test_other_modalities_are_refused_with_their_name():
    assert reason(bundled("CT_small.dcm"), "x.dcm") == (
        "'x.dcm' is a CT DICOM; only MR slices are accepted"
    )


def test_a_multi_frame_file_is_refused():
    dataset = mr_slice(NumberOfFrames=2)
    dataset.PixelData = dataset.PixelData * 2

    assert reason(to_bytes(dataset)) == (
        "'slice.dcm' is a multi-frame DICOM (2 frames); upload one slice per file"
    )


def test_a_file_without_pixel_data_is_refused():
    dataset = mr_slice()
    del dataset.PixelData

    assert reason(to_bytes(dataset)) == "'slice.dcm' is a DICOM file without pixel data"


def test_burned_in_annotation_is_refused():
    assert reason(to_bytes(mr_slice(BurnedInAnnotation="YES"))) == (
        "'slice.dcm' has burned-in annotation (BurnedInAnnotation YES): text in the pixels "
        "may identify the patient, so it is not accepted"
    )


def test_a_transfer_syntax_nobody_here_decodes_is_refused_with_its_name():
    dataset = mr_slice()
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    dataset.PixelData = encapsulate([dataset.PixelData])

    assert reason(to_bytes(dataset)) == (
        "'slice.dcm' uses the transfer syntax MPEG2 Main Profile / Main Level "
        "(1.2.840.10008.1.2.4.100), which this server cannot decode; send it uncompressed "
        "or as JPEG, JPEG-LS, JPEG 2000 or RLE"
    )


def test_pixel_data_shorter_than_its_header_says_is_refused():
    assert reason(bundled("MR_truncated.dcm")).startswith(
        "'slice.dcm': the DICOM pixel data could not be decoded (The number of bytes of pixel "
        "data is less than expected"
    )


def test_a_colour_image_is_refused():
    dataset = mr_slice(PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    dataset.PixelData = dataset.PixelData * 3

    assert reason(to_bytes(dataset)) == (
        "'slice.dcm' is a RGB DICOM image; only grayscale (MONOCHROME1/MONOCHROME2) MR slices "
        "are accepted"
    )


def test_size_limits_apply_as_to_any_image(settings):
    assert reason(to_bytes(mr_slice(side=16))) == (
        "'slice.dcm' is 16x16 pixels; each side must be at least 32"
    )
    settings.MAX_IMAGE_PIXELS = 1000
    assert reason(to_bytes(mr_slice(side=64))) == (
        "'slice.dcm' is 64x64 pixels; the limit is 1000 pixels"
    )


def test_a_header_that_does_not_parse_is_refused_without_quoting_it():
    data = to_bytes(mr_slice(PatientName="ZQSECRET^NAME"))
    # The patient name's value representation becomes one no DICOM version has.
    broken = data.replace(b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00XX", 1)
    assert broken != data

    assert reason(broken) == "'slice.dcm' is not a readable DICOM file (NotImplementedError)"


def test_a_file_cut_inside_its_header_has_no_pixel_data():
    data = to_bytes(mr_slice(PatientName="ZQSECRET^NAME"))

    assert reason(data[: data.index(b"ZQSECRET") + 3]) == (
        "'slice.dcm' is a DICOM file without pixel data"
    )


# --- De-identification ---------------------------------------------------------------------


def test_no_basic_profile_attribute_nested_value_or_private_tag_survives():
    dataset, markers = phi_slice()
    upload = to_bytes(dataset)
    assert all(marker.encode() in upload for marker in markers), "a marker was never uploaded"

    stored = read(upload).data

    assert [what for marker, what in markers.items() if marker.encode() in stored] == []
    cleaned = pydicom.dcmread(io.BytesIO(stored))
    assert cleaned.PatientIdentityRemoved == "YES"
    assert cleaned.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not any(element.tag.is_private for element in cleaned.iterall())
    assert cleaned.Modality == "MR" and cleaned.pixel_array.shape == (64, 64)
    # The original preamble may hold anything (TIFF/DICOM dual files): it is zeroed.
    assert stored[:128] == b"\0" * 128


def test_uids_are_replaced_by_keyed_hashes_consistent_per_site(settings):
    study = "1.2.826.0.1.3680043.8.498.77.1"
    first = read(to_bytes(mr_slice(study_uid=study, seed=1)))
    second = read(to_bytes(mr_slice(study_uid=study, seed=2)))
    elsewhere = read(to_bytes(mr_slice(study_uid=study, seed=1)), scope="site:2")
    expected = dicom.pseudonymous_uid(study, scope=SCOPE)
    settings.DICOM_PSEUDONYM_KEY = "another key"
    other_key = read(to_bytes(mr_slice(study_uid=study, seed=1)))

    assert first.study_uid == second.study_uid == expected
    assert first.instance_uid != second.instance_uid
    assert len({first.study_uid, elsewhere.study_uid, other_key.study_uid}) == 3
    for uid in (first.study_uid, first.series_uid, first.instance_uid):
        assert uid.startswith("2.25.") and UID(uid).is_valid and study not in uid


def test_the_same_file_de_identifies_to_the_same_bytes():
    # Repeated uploads of a slice are recognised by their bytes, like any other image.
    assert read(bundled("MR_small.dcm")).data == read(bundled("MR_small.dcm")).data


def test_pydicoms_warnings_which_quote_values_never_reach_the_logs(caplog, capsys):
    caplog.set_level(logging.DEBUG)
    data = to_bytes(mr_slice(PatientBirthDate="ZQBADDATE", PatientAge="ZQAGE"))
    capsys.readouterr()  # what building the file above printed
    caplog.clear()

    read(data)

    logged = "\n".join(record.getMessage() for record in caplog.records)
    printed = "".join(capsys.readouterr())
    assert "ZQ" not in logged and "ZQ" not in printed
