"""Volume files in and out: NIfTI (nibabel) and DeepReg's HDF5.

Arrays come back in the file's own dtype (no float64 surprise for label maps) together with a
4x4 voxel-to-world affine in mm. Every problem with a file is a :class:`DataError` naming it.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from regflow.errors import DataError
from regflow.fileio import write_bytes

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The file name without its ``.nii``/``.nii.gz`` suffix (the case id)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(array, affine)``: the voxel array, shape (X, Y, Z) or (X, Y, Z, C), in the stored dtype
        (float only where the header asks for intensity scaling), and the (4, 4) float64 affine
        mapping voxel indices to world coordinates in mm.

    Raises:
        DataError: the file is missing or is not a readable NIfTI file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: not a readable NIfTI file ({_reason(exc)})") from None
    return np.asarray(array), np.asarray(image.affine, dtype=np.float64)


def volume_shape(path: str | Path, key: str | None = None) -> tuple[int, ...]:
    """The array shape of a NIfTI file (from its header) or of HDF5 dataset ``key``, unread.

    Raises:
        DataError: the file is missing or unreadable, or has no dataset ``key``.
    """
    path = Path(path)
    if key is not None:
        with _open_h5(path) as handle:
            return tuple(_h5_dataset(handle, path, key).shape)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return tuple(nib.load(str(path)).shape)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: not a readable NIfTI file ({_reason(exc)})") from None


def h5_keys(path: str | Path) -> list[str]:
    """The sorted dataset keys at the top level of an HDF5 file.

    Raises:
        DataError: the file is missing or is not a readable HDF5 file.
    """
    with _open_h5(Path(path)) as handle:
        return sorted(key for key in handle if isinstance(handle[key], h5py.Dataset))


def read_h5_volume(path: str | Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one volume (dataset ``key``) from a DeepReg-style HDF5 file.

    HDF5 volumes carry no geometry: the affine is diagonal, from a ``spacing`` attribute (mm per
    voxel, on the dataset or else on the file) when there is one, and the identity otherwise.

    Args:
        path: the ``.h5`` file.
        key: the dataset name (a case id).

    Returns:
        ``(array, affine)`` as :func:`read_volume` returns them.

    Raises:
        DataError: the file is unreadable or has no dataset ``key``.
    """
    path = Path(path)
    with _open_h5(path) as handle:
        dataset = _h5_dataset(handle, path, key)
        try:
            array = dataset[()]
        except _READ_ERRORS as exc:
            raise DataError(f"{path}[{key}]: not readable ({_reason(exc)})") from None
        spacing = dataset.attrs.get("spacing", handle.attrs.get("spacing"))
    affine = np.eye(4)
    if spacing is not None:
        spacing = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
        ndim = min(len(spacing), 3)
        affine[np.arange(ndim), np.arange(ndim)] = spacing[:ndim]
    return np.asarray(array), affine


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI file atomically (see :func:`regflow.fileio.write_bytes`).

    A ``.nii.gz`` is gzipped at level 1 (nibabel's default) with a zero timestamp, so the same
    volume always gives the same bytes (and the same sha256 in manifests and dvc.lock).

    Args:
        path: target ``.nii`` or ``.nii.gz`` file; its folder must exist.
        array: voxel array, (X, Y, Z) or (X, Y, Z, C); its dtype is kept.
        affine: (4, 4) voxel-to-world matrix in mm, stored as both qform and sform.

    Returns:
        The written path.
    """
    path = Path(path)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    payload = image.to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
    return write_bytes(path, payload)


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({_reason(exc)})") from None


def _h5_dataset(handle: h5py.File, path: Path, key: str) -> h5py.Dataset:
    if key not in handle or not isinstance(handle[key], h5py.Dataset):
        raise DataError(f"{path}: no dataset {key!r}")
    return handle[key]


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
