"""Serving wire format: volumes as base64 strings of ``.nii.gz`` or ``.npy`` files.

A request ``{"inputs": {"fixed": [b64, ...], "moving": [b64, ...], "moving_label": [b64, ...]}}``
reaches a pyfunc model's ``predict`` as a dict of 1-D numpy string arrays (no signature) or as a
pandas DataFrame with one string column per field (column signature); :func:`parse_request`
accepts both, and the raw JSON dict too. Every problem is a :class:`RequestError` naming the field,
e.g. ``inputs.moving[0]: not valid base64``.

Layout on the wire: NIfTI stores channels last (``(D, H, W, C)``, as DeepReg's label files do);
``.npy`` stores the channel-first array as it is (``(C, D, H, W)``). Decoded arrays are float32.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from regflow.arrays import to_numpy
from regflow.errors import RegflowError

ENCODINGS = ("nii.gz", "npy")
REQUIRED_FIELDS = ("fixed", "moving")
OPTIONAL_FIELDS = ("moving_label",)
RESPONSE_FIELDS = ("ddf", "warped", "warped_label")
MAX_DECODED_BYTES = 2**31  # refuse gzip members that inflate past 2 GiB

_GZIP_MAGIC = b"\x1f\x8b"
_NPY_MAGIC = b"\x93NUMPY"


class RequestError(RegflowError):
    """A serving request is malformed; the message names the field (``inputs.moving[0]: ...``)."""


def _wire_array(array: Any) -> np.ndarray:
    """``array`` as numpy in a dtype the wire carries: floats as float32, booleans as uint8."""
    array = to_numpy(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        return array.astype(np.float32)
    return array


def encode_volume(array: Any, affine: Any = None, encoding: str = "nii.gz") -> str:
    """Encode a volume as the base64 text of a ``.nii.gz`` or ``.npy`` file.

    Args:
        array: numpy array or torch tensor, (D, H, W) or channel-first (C, D, H, W) (2-D: (H, W)
            or (C, H, W)). Floats are written as float32, booleans as uint8.
        affine: (4, 4) voxel-to-world matrix in mm for NIfTI (None: identity); ignored for npy.
        encoding: ``"nii.gz"`` (channels moved last, as NIfTI expects) or ``"npy"`` (as given).

    Returns:
        ASCII base64 text of the file bytes.

    Raises:
        RegflowError: unknown encoding.
    """
    array = _wire_array(array)
    if encoding == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        payload = buffer.getvalue()
    elif encoding == "nii.gz":
        if array.ndim == 4:  # (C, D, H, W) -> (D, H, W, C)
            array = np.moveaxis(array, 0, -1)
        affine = np.eye(4) if affine is None else to_numpy(affine).astype(np.float64)
        image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
        image.header.set_xyzt_units("mm")
        payload = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
    else:
        raise RegflowError(f"encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")
    return base64.b64encode(payload).decode("ascii")


def _b64_bytes(text: Any, name: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(f"{name}: expected a base64 string, got {type(text).__name__}")
    compact = "".join(text.split())
    if not compact:
        raise RequestError(f"{name}: empty string")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name}: not valid base64") from None


def _gunzip(payload: bytes, name: str) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(payload, MAX_DECODED_BYTES)
    except zlib.error:
        raise RequestError(f"{name}: corrupt gzip data") from None
    if inflater.unconsumed_tail:
        raise RequestError(f"{name}: volume inflates past {MAX_DECODED_BYTES} bytes")
    return data


def _is_nifti(payload: bytes) -> bool:
    if len(payload) < 348:
        return False
    return payload[344:348] == b"n+1\x00" or payload[4:8] == b"n+2\x00"


def _read_nifti(payload: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    image_class = nib.Nifti2Image if payload[4:8] == b"n+2\x00" else nib.Nifti1Image
    try:
        image = image_class.from_bytes(payload)
        return image.get_fdata(dtype=np.float32), np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for truncated/odd files
        raise RequestError(f"{name}: unreadable NIfTI ({exc.__class__.__name__})") from None


def _read_npy(payload: bytes, name: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise RequestError(f"{name}: unreadable .npy file (object arrays are refused)") from None
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise RequestError(f"{name}: .npy dtype {array.dtype} is not numeric")
    return array.astype(np.float32)


def _check_shape(array: np.ndarray, name: str, channels: bool, encoding: str) -> np.ndarray:
    shape = tuple(array.shape)
    if encoding == "nii.gz" and array.ndim == 5 and shape[3] == 1:  # (D, H, W, 1, C) vectors
        array = array[:, :, :, 0]
    if channels:
        if array.ndim == 3:
            return array[None]
        if array.ndim == 4:
            return np.moveaxis(array, -1, 0) if encoding == "nii.gz" else array
    else:
        if array.ndim == 3:
            return array
        if array.ndim == 4 and array.shape[0] == 1:
            return array[0]
        if array.ndim == 4 and array.shape[-1] == 1:
            return array[..., 0]
    expected = "(D, H, W) or with channels" if channels else "(D, H, W) or a singleton channel"
    raise RequestError(f"{name}: expected a 3-D volume {expected}, got shape {shape}")


def decode_volume(text: Any, name: str, channels: bool = False
                  ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Decode base64 text of a ``.nii.gz`` / ``.nii`` / ``.npy`` file, found by its magic bytes.

    Args:
        text: the base64 string (whitespace is ignored).
        name: the field, used in error messages (e.g. ``"inputs.moving[0]"``).
        channels: False: return (D, H, W), squeezing one singleton channel (leading or trailing).
            True: return channel-first (C, D, H, W) (NIfTI channels-last moved first; 3-D -> C=1).

    Returns:
        ``(array float32, affine (4, 4) float64 in mm or None for npy, encoding)`` with encoding
        ``"nii.gz"`` or ``"npy"`` (the encoding to answer in).

    Raises:
        RequestError: not base64, not a NIfTI or npy volume, wrong dimensionality, NaN/inf values.
    """
    payload = _b64_bytes(text, name)
    if payload[:2] == _GZIP_MAGIC:
        payload = _gunzip(payload, name)
        if not _is_nifti(payload):
            raise RequestError(f"{name}: gzip data is not a NIfTI file")
    if _is_nifti(payload):
        array, affine, encoding = *_read_nifti(payload, name), "nii.gz"
    elif payload[:6] == _NPY_MAGIC:
        array, affine, encoding = _read_npy(payload, name), None, "npy"
    else:
        raise RequestError(f"{name}: not a .nii.gz, .nii or .npy volume")
    array = _check_shape(array, name, channels, encoding)
    if not np.isfinite(array).all():
        raise RequestError(f"{name}: contains NaN or infinite values")
    return array, affine, encoding


def _column(payload: Mapping[str, Any], field: str) -> list[Any]:
    values = payload[field]
    if hasattr(values, "tolist") and not isinstance(values, str):  # numpy array, pandas Series
        values = values.tolist()
        if len(values) == 1 and isinstance(values[0], list | tuple):
            values = list(values[0])  # MLflow turns a dict of lists into one row of lists
    if isinstance(values, str):
        return [values]
    if not isinstance(values, Sequence):
        raise RequestError(f"inputs.{field}: expected a list of base64 strings")
    if not values:
        raise RequestError(f"inputs.{field}: empty list")
    return list(values)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def parse_request(payload: Any) -> list[dict[str, Any]]:
    """Decode a serving request into registration pairs.

    Args:
        payload: what ``predict`` receives: a dict of field -> list / numpy string array, a pandas
            DataFrame with one string column per field, or the raw ``{"inputs": {...}}`` JSON dict.
            Fields: ``fixed``, ``moving`` (required), ``moving_label`` (optional; a missing entry,
            None or NaN means no label for that pair). All lists have the same length.

    Returns:
        One dict per pair: ``fixed``, ``moving`` (D, H, W) float32; ``moving_label`` (L, D, H, W)
        float32 or None; ``fixed_affine``, ``moving_affine`` (4, 4) mm or None (npy);
        ``encoding`` of the fixed image (``"nii.gz"`` or ``"npy"``), to answer in.

    Raises:
        RequestError: missing/unknown field, unequal list lengths, or a bad volume (named).
    """
    if hasattr(payload, "to_dict") and hasattr(payload, "columns"):  # pandas DataFrame
        payload = {str(column): payload[column] for column in payload.columns}
    if not isinstance(payload, Mapping):
        raise RequestError(f"inputs: expected a mapping of fields, got {type(payload).__name__}")
    if set(payload) == {"inputs"}:
        payload = payload["inputs"]
        if not isinstance(payload, Mapping):
            raise RequestError("inputs: expected a mapping of fields (fixed, moving, ...)")
    allowed = REQUIRED_FIELDS + OPTIONAL_FIELDS
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        raise RequestError(f"inputs: unknown field(s) {', '.join(unknown)}; "
                           f"expected {', '.join(allowed)}")
    missing = [field for field in REQUIRED_FIELDS if field not in payload]
    if missing:
        raise RequestError(f"inputs: missing field(s) {', '.join(missing)}")
    columns = {field: _column(payload, field) for field in allowed if field in payload}
    count = len(columns["fixed"])
    for field, values in columns.items():
        if len(values) != count:
            raise RequestError(
                f"inputs.{field}: {len(values)} volumes but inputs.fixed has {count}")

    pairs = []
    for index in range(count):
        fixed, fixed_affine, encoding = decode_volume(columns["fixed"][index],
                                                      f"inputs.fixed[{index}]")
        moving, moving_affine, _ = decode_volume(columns["moving"][index],
                                                 f"inputs.moving[{index}]")
        moving_label = None
        label_text = columns.get("moving_label", [None] * count)[index]
        if not _is_missing(label_text):
            name = f"inputs.moving_label[{index}]"
            moving_label, _, _ = decode_volume(label_text, name, channels=True)
            if moving_label.shape[1:] != moving.shape:
                raise RequestError(f"{name}: shape {moving_label.shape[1:]} does not match "
                                   f"inputs.moving[{index}] shape {moving.shape}")
        pairs.append({"fixed": fixed, "moving": moving, "moving_label": moving_label,
                      "fixed_affine": fixed_affine, "moving_affine": moving_affine,
                      "encoding": encoding})
    return pairs


def build_response(results: Sequence[Mapping[str, Any]], encoding: str | Sequence[str]
                   ) -> dict[str, list[str | None]]:
    """Encode model outputs into the response body's ``predictions`` mapping.

    Args:
        results: one mapping per pair with ``ddf`` (ndim, D, H, W) voxels, ``warped`` (D, H, W) or
            (1, D, H, W), optional ``warped_label`` (L, D, H, W) and optional ``affine`` (4, 4) mm
            (the fixed image's; NIfTI outputs carry it).
        encoding: one encoding for all pairs, or one per pair (``"nii.gz"`` / ``"npy"``).

    Returns:
        ``{"ddf": [b64, ...], "warped": [b64, ...], "warped_label": [b64, ...]}``; a field no
        result has is left out (e.g. no ``ddf`` for the conditional method), and a pair lacking
        a field another pair has gets None there.
    """
    encodings = [encoding] * len(results) if isinstance(encoding, str) else list(encoding)
    fields = [field for field in RESPONSE_FIELDS
              if any(result.get(field) is not None for result in results)]
    return {field: [None if result.get(field) is None
                    else encode_volume(result[field], result.get("affine"), enc)
                    for result, enc in zip(results, encodings, strict=True)]
            for field in fields}
