"""The in-memory volume every reader returns and every writer takes: voxels plus a RAS affine."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip, igzip_threaded

from pipeline.io.atomic import atomic_path
from pipeline.system import available_cores


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
        """A NIfTI-1 image whose qform and sform are both this affine (code 1, scanner).

        A volume whose orientation is unknown (``meta["affine_source"] == "none"``: a NIfTI
        without qform/sform codes, staged by opt-in) keeps codes 0, so no reader takes its
        pixdim-only affine for a known orientation.
        """
        code = 0 if self.meta.get("affine_source") == "none" else 1
        img = nib.Nifti1Image(self.data, self.affine)
        img.set_qform(self.affine, code=code)
        img.set_sform(self.affine, code=code)
        img.header.set_xyzt_units("mm", "sec")
        return img


class _ForwardOnly(io.RawIOBase):
    """A write-only stream that reports its position, for nibabel over a non-seekable writer.

    nibabel seeks to where it already is before writing the header and the voxels; any other
    seek is refused, so the output is never silently wrong.
    """

    def __init__(self, fh: Any) -> None:
        self._fh, self._pos = fh, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._fh.write(data)
        n = memoryview(data).nbytes
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if (whence == io.SEEK_SET and pos == self._pos) or (whence == io.SEEK_CUR and pos == 0):
            return self._pos
        raise io.UnsupportedOperation(f"forward-only stream at {self._pos}: cannot seek to {pos} ({whence})")


THREADED_GZIP_BYTES = 8 << 20  # volumes this large are compressed by several threads


def _gzip_threads() -> int:
    return min(4, available_cores())


def save_nifti(volume: Volume, path: str | Path) -> Path:
    """Write `volume` atomically as NIfTI (.nii or .nii.gz by the name), qform == sform.

    .nii.gz is compressed with ISA-L's gzip (python-isal) at level 1: a standard gzip stream,
    about three times faster than zlib's level 1 at a similar size (compression is most of a
    conversion's time). Volumes of 8 MiB and more are compressed in 1 MiB blocks by up to four
    threads (isal.igzip_threaded); the bytes do not depend on the number of threads. No name and
    mtime 0 in the gzip header: the same volume always gives the same file.
    """
    path = Path(path)
    img = volume.to_nifti()
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            with open(tmp, "wb") as raw:
                if volume.data.nbytes >= THREADED_GZIP_BYTES:
                    with igzip_threaded.open(raw, "wb", compresslevel=1, threads=_gzip_threads()) as fh:
                        img.to_file_map({"image": nib.FileHolder(fileobj=_ForwardOnly(fh))})
                else:
                    with igzip.IGzipFile("", "wb", 1, fileobj=raw, mtime=0) as fh:
                        img.to_file_map({"image": nib.FileHolder(fileobj=fh)})
        else:
            nib.save(img, tmp)
    return path
