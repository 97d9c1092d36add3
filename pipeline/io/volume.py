"""The in-memory volume every reader returns and every writer takes: voxels plus a RAS affine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip

from pipeline.io.atomic import atomic_path


@dataclass
class Volume:
    """A 3D image or label map on a grid placed in patient space.

    `data` is indexed (i, j, k) as nibabel does; `affine` maps voxel indices to RAS+ millimetres
    (the NIfTI convention; DICOM's LPS is converted by the readers).
    """

    data: np.ndarray  # (I, J, K) voxel values: float32 / int16 images, uint8 / uint16 labels
    affine: np.ndarray  # (4, 4) voxel -> RAS mm
    modality: str = "unknown"  # CT, MR, ... as read from the source, or "unknown"
    meta: dict[str, Any] = field(default_factory=dict)  # non-identifying facts (no PHI, no UIDs)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.data.ndim != 3:
            raise ValueError(f"Volume data must be 3D, got shape {self.data.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def to_nifti(self) -> nib.Nifti1Image:
        """A NIfTI-1 image whose qform and sform are both this affine (code 1, scanner)."""
        img = nib.Nifti1Image(self.data, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        return img


def save_nifti(volume: Volume, path: str | Path) -> Path:
    """Write `volume` atomically as NIfTI (.nii or .nii.gz by the name), qform == sform.

    .nii.gz is compressed with ISA-L's gzip (python-isal) at level 1: a standard gzip stream,
    about three times faster than zlib's level 1 at a similar size (compression is most of a
    conversion's time).
    """
    path = Path(path)
    img = volume.to_nifti()
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            # No name and mtime 0 in the gzip header: the same volume always gives the same bytes
            with open(tmp, "wb") as raw, igzip.IGzipFile("", "wb", 1, fileobj=raw, mtime=0) as fh:
                img.to_file_map({"image": nib.FileHolder(fileobj=fh)})
        else:
            nib.save(img, tmp)
    return path
