"""Write a volume as a real single-frame DICOM series (CT or MR Image Storage), any geometry.

The geometry is explicit so tests can build every case the series builder must handle: axial,
sagittal, coronal, oblique and feet-first series, missing slices, uneven gaps, gantry tilt,
duplicate positions, shuffled file order and InstanceNumbers that disagree with position.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run +x (L), columns run +y (P): normal +z (S)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal -y... rows +x, columns towards feet
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows +y, columns towards feet


@dataclass
class Patient:
    """Identifying tags: synthetic, but as complete as a scanner writes them."""

    name: str = "DOE^JANE"
    patient_id: str = "PID0001"
    birth_date: str = "19700101"
    sex: str = "F"


@dataclass
class SeriesSpec:
    """Everything about a series except its voxels."""

    modality: str = "CT"  # CT or MR
    orientation: Sequence[float] = AXIAL  # ImageOrientationPatient: row cosines, then column cosines
    origin: Sequence[float] = (-100.0, -120.0, -50.0)  # ImagePositionPatient of slice 0 (mm, LPS)
    pixel_spacing: Sequence[float] = (1.0, 1.0)  # (between rows, between columns) in mm
    slice_spacing: float = 2.5  # along the slice normal, mm
    positions: np.ndarray | None = None  # (n, 3) explicit positions: overrides origin/slice_spacing
    slice_thickness: float | None = None  # written as SliceThickness (defaults to slice_spacing)
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    signed: bool = True  # PixelRepresentation 1 (int16) or 0 (uint16)
    bits_stored: int = 16  # BitsStored (HighBit one less); values must fit; 16 bits are allocated
    photometric: str = "MONOCHROME2"
    patient: Patient = field(default_factory=Patient)
    study_uid: str | None = None
    series_uid: str | None = None
    frame_of_reference_uid: str | None = None
    series_number: int = 1
    series_description: str = "SYNTHETIC"
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    patient_position: str = "HFS"
    acquisition_number: int = 1
    echo_number: int | None = None  # MR only
    transfer_syntax: str = ExplicitVRLittleEndian
    instance_numbers: Sequence[int] | None = None  # default 1..n in position order
    file_names: Sequence[str] | None = None  # default IM000001.. in a shuffled order
    seed: int = 0  # drives UIDs (when not given) and the file-name order


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return np.cross(row, col)


def slice_positions(spec: SeriesSpec, n: int) -> np.ndarray:
    """(n, 3) ImagePositionPatient per slice, in slice order."""
    if spec.positions is not None:
        return np.asarray(spec.positions, float)
    normal = slice_normal(spec.orientation)
    return np.asarray(spec.origin, float) + np.outer(np.arange(n) * spec.slice_spacing, normal)


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _uid(rng: np.random.Generator) -> UID:
    # Seeded UIDs: the same seed gives the same files, byte for byte.
    return generate_uid(entropy_srcs=[str(rng.integers(0, 2**63))])


def write_dicom_series(volume: np.ndarray, out_dir: str | Path, spec: SeriesSpec | None = None) -> list[Path]:
    """Write `volume` (slices, rows, columns) of stored values as one DICOM file per slice.

    Stored values are written as given (int16 or uint16); the modality value of a voxel is
    stored * RescaleSlope + RescaleIntercept. Returns the written paths in slice order.
    """
    spec = spec or SeriesSpec()
    if spec.modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {', '.join(SOP_CLASSES)}; got {spec.modality!r}")
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (slices, rows, columns); got shape {volume.shape}")
    n, rows, cols = volume.shape
    dtype = np.int16 if spec.signed else np.uint16
    if not 1 <= spec.bits_stored <= 16:
        raise ValueError(f"bits_stored must be 1..16; got {spec.bits_stored}")
    lo, hi = (
        (-(2 ** (spec.bits_stored - 1)), 2 ** (spec.bits_stored - 1) - 1)
        if spec.signed
        else (0, 2**spec.bits_stored - 1)
    )
    if volume.min() < lo or volume.max() > hi:
        raise ValueError(
            f"stored values {volume.min()}..{volume.max()} do not fit {spec.bits_stored} bits "
            f"({'signed' if spec.signed else 'unsigned'}): {lo}..{hi}"
        )
    stored = volume.astype(dtype)

    rng = np.random.default_rng(spec.seed)
    study_uid = spec.study_uid or _uid(rng)
    series_uid = spec.series_uid or _uid(rng)
    for_uid = spec.frame_of_reference_uid or _uid(rng)
    positions = slice_positions(spec, n)
    if len(positions) != n:
        raise ValueError(f"{len(positions)} positions given for {n} slices")
    instance_numbers = list(spec.instance_numbers or range(1, n + 1))
    names = list(spec.file_names or [f"IM{i:06d}" for i in rng.permutation(n) + 1])
    normal = slice_normal(spec.orientation)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    when = dt.datetime(2026, 1, 1, 8, 0, 0) + dt.timedelta(minutes=int(rng.integers(0, 60 * 24 * 300)))

    paths = []
    for k in range(n):
        sop_uid = _uid(rng)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASSES[spec.modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(spec.image_type)
        ds.SOPClassUID = SOP_CLASSES[spec.modality]
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
        ds.AccessionNumber = f"ACC{rng.integers(10**6, 10**7)}"
        ds.Modality = spec.modality
        ds.Manufacturer = "unet-pipeline synthetic"
        ds.InstitutionName = "Synthetic General Hospital"
        ds.ReferringPhysicianName = "REFERRER^A"
        ds.StudyDescription = "SYNTHETIC STUDY"
        ds.SeriesDescription = spec.series_description
        ds.PatientName = spec.patient.name
        ds.PatientID = spec.patient.patient_id
        ds.PatientBirthDate = spec.patient.birth_date
        ds.PatientSex = spec.patient.sex
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = spec.series_number
        ds.AcquisitionNumber = spec.acquisition_number
        ds.InstanceNumber = instance_numbers[k]
        ds.PatientPosition = spec.patient_position
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        # DS values are at most 16 characters: auto_format keeps oblique geometry conformant.
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in spec.orientation]
        ds.SliceLocation = _ds(np.dot(positions[k], normal))
        ds.SliceThickness = spec.slice_thickness if spec.slice_thickness is not None else spec.slice_spacing
        ds.PixelSpacing = [float(v) for v in spec.pixel_spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = spec.photometric
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        ds.BitsStored = spec.bits_stored
        ds.HighBit = spec.bits_stored - 1
        ds.PixelRepresentation = 1 if spec.signed else 0
        ds.RescaleIntercept = spec.rescale_intercept
        ds.RescaleSlope = spec.rescale_slope
        ds.RescaleType = "HU" if spec.modality == "CT" else "US"
        ds.WindowCenter, ds.WindowWidth = (40, 400) if spec.modality == "CT" else (300, 600)
        if spec.modality == "CT":
            ds.KVP = 120
            ds.ConvolutionKernel = "STANDARD"
        else:
            ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
            ds.ScanOptions, ds.MRAcquisitionType = "", "2D"
            ds.RepetitionTime, ds.EchoTime = 500.0, 15.0
            ds.MagneticFieldStrength = 1.5
            ds.EchoNumbers = spec.echo_number or 1
        ds.PixelData = stored[k].tobytes()
        if spec.transfer_syntax == DeflatedExplicitVRLittleEndian:
            meta.TransferSyntaxUID = spec.transfer_syntax  # pydicom deflates the dataset on save
        elif spec.transfer_syntax != ExplicitVRLittleEndian:
            # pixel encoders: RLE, JPEG-LS, JPEG 2000 (lossless); keep our seeded SOP Instance UID
            ds.compress(spec.transfer_syntax, generate_instance_uid=False)
        path = out_dir / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_bare_data_sets(paths: Sequence[Path], *, implicit_vr: bool, little_endian: bool = True) -> None:
    """Rewrite written files as old archives keep them: no preamble, no file meta, only the data set.

    The data set is encoded implicit or explicit VR, little or big endian as asked; nothing in the
    file says which (a reader must tell from the bytes). Native pixel data only.
    """
    for path in paths:
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            raise ValueError(f"{path}: a bare data set cannot hold compressed pixel data")
        stored = ds.pixel_array
        if not little_endian:  # the Pixel Data bytes are written as given: swap 16-bit words here
            ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(
            path,
            ds,
            implicit_vr=implicit_vr,
            little_endian=little_endian,
            enforce_file_format=False,
            force_encoding=True,
        )


def read_stored(path: str | Path) -> np.ndarray:
    """Stored pixel values of one written file (for tests)."""
    return pydicom.dcmread(path).pixel_array
