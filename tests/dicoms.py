"""DICOM files for tests: pydicom's bundled samples, and MR slices built here, including one
with every attribute of the PS3.15 basic profile that holds text filled with a marker."""

import io
import uuid

import numpy as np
import pydicom
from dicomanonymizer import simpledicomanonymizer
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from diagnostics.dicom import PROFILE_EDITION

# Study UIDs of the slices built here, under pydicom's own test root (never a real one).
UID_ROOT = "1.2.826.0.1.3680043.8.498.77."
# Dates and times no basic-profile date may keep (unlike a text marker, they fit DA/TM).
MARKER_DATE = "19230417"
MARKER_TIME = "231719"


def bundled(name: str) -> bytes:
    """One of the files pydicom's wheel ships (no download)."""
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not bundled with pydicom"
    with open(path, "rb") as file:
        return file.read()


def to_bytes(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def mr_slice(
    *,
    study_uid: str | None = None,
    instance_uid: str | None = None,
    side: int = 64,
    seed: int = 0,
    **attributes,
) -> Dataset:
    """A valid single-frame 16-bit MR slice (uncompressed), with `attributes` set on it.
    The same study and seed give the same file (series 1 of the study, instance `seed`);
    without a study, a new one."""
    study_uid = study_uid or f"{UID_ROOT}{uuid.uuid4().int % 10**12}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = instance_uid or f"{study_uid}.1.{seed}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = f"{study_uid}.1"
    dataset.Modality = "MR"
    dataset.SeriesNumber = 3
    dataset.InstanceNumber = seed + 1
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows = dataset.Columns = side
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    pixels = (np.add.outer(np.arange(side), np.arange(side)) * 20).astype(np.uint16)
    pixels += rng.integers(0, 50, size=pixels.shape, dtype=np.uint16)
    dataset.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return dataset


def marker_for(tag) -> str:
    """A text no DICOM file has by chance, fitting every string VR (16 characters at most)."""
    return f"ZQ{tag[0]:04X}{tag[1]:04X}"


def _marker_value(tag, vr: str):
    if vr in ("LO", "SH", "CS", "AE", "LT", "ST", "UT", "UC"):
        return marker_for(tag)
    if vr == "PN":
        return f"{marker_for(tag)}^ZQGIVEN"
    if vr == "DA":
        return MARKER_DATE
    if vr == "TM":
        return MARKER_TIME
    if vr == "DT":
        return MARKER_DATE + MARKER_TIME
    if vr == "UI":
        return f"{UID_ROOT}{tag[0]}.{tag[1]}"
    if vr == "UR":
        return f"http://{marker_for(tag).lower()}.invalid/"
    return None  # numbers, binary and sequences: no text marker to search for


def phi_slice() -> tuple[Dataset, dict[str, str]]:
    """An MR slice with every text attribute the basic profile lists set to a marker, plus
    identifiers nested in a sequence and in private tags. Returns the dataset and
    {marker: what it is} for every text that must not be stored anywhere."""
    dataset = mr_slice()
    markers: dict[str, str] = {}
    actions = simpledicomanonymizer.initialize_actions(PROFILE_EDITION)
    for tag, action in actions.items():
        if len(tag) != 2 or tag[0] in (0x0000, 0x0002) or action is simpledicomanonymizer.keep:
            continue
        if not pydicom.datadict.dictionary_has_tag(tag):
            continue
        vr = pydicom.datadict.dictionary_VR(tag)
        value = _marker_value(tag, vr)
        if value is None or pydicom.datadict.keyword_for_tag(tag) in (
            # The slice must stay readable: these hold what the file needs to be one.
            "SOPInstanceUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
        ):
            continue
        dataset.add_new(tag, vr, value)
        if vr not in ("DA", "TM", "DT"):
            markers[value if vr != "PN" else marker_for(tag)] = pydicom.datadict.keyword_for_tag(
                tag
            )
    markers[MARKER_DATE] = "dates"
    # The UIDs that the pseudonymous ones replace.
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        markers[str(dataset.data_element(keyword).value)] = keyword
    # Identifiers nested in a sequence the profile keeps, and in private tags.
    nested = Dataset()
    nested.PatientID = "ZQNESTEDID"
    nested.AccessionNumber = "ZQNESTEDACC"
    # A sequence the profile keeps: only a pass inside its items finds these.
    dataset.AnatomicRegionSequence = Sequence([nested])
    markers["ZQNESTEDID"] = "PatientID in a sequence item"
    markers["ZQNESTEDACC"] = "AccessionNumber in a sequence item"
    block = dataset.private_block(0x0011, "ZQ PRIVATE CREATOR", create=True)
    block.add_new(0x01, "LO", "ZQPRIVATEVALUE")
    markers["ZQPRIVATEVALUE"] = "a private tag"
    markers["ZQ PRIVATE CREATOR"] = "a private creator"
    return dataset, markers
