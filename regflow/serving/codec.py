"""Serving wire format: volumes as base64 strings of ``.nii.gz`` or ``.npy`` files.

A request ``{"inputs": {"fixed": [b64, ...], "moving": [b64, ...], "moving_label": [b64, ...]}}``
reaches a pyfunc model's ``predict`` as a dict of numpy arrays (the served model declares no input
schema, so MLflow passes every field on untouched) or, for the ``dataframe_*`` formats, as a pandas
DataFrame; :func:`read_request` accepts both, and the raw JSON dict too. ``null`` (JSON null, None,
NaN) means absent: a ``moving_label`` that is null, or null for one pair, is no label. Every problem
is a :class:`RequestError` naming the field (``inputs.moving[0]: not valid base64``), an unknown
field included. Beside the volumes a request may carry one setting, ``refine_steps`` (an integer
for every pair, or one per pair); an answer to such a request adds the :data:`REPORT_FIELDS`. A
request over a resource limit (:mod:`regflow.serving.limits`) is a
:class:`~regflow.errors.RequestTooLarge`, found from the file headers (the first 540 inflated bytes
of a ``.nii.gz``, the header of a ``.npy``) before any voxel data is inflated or decoded; inflating
stops at the size the header declares. Images whose header geometry cannot be registered are
refused there too (:mod:`regflow.geometry`).

Layout on the wire: NIfTI stores channels last (``(D, H, W, C)`` or ``(D, H, W, 1, C)``, as
DeepReg's label files do); ``.npy`` stores the channel-first array as it is (``(C, D, H, W)``).
Decoded arrays are float32 with the values as sent: labels are not rounded (integer label maps keep
their values, one-hot and soft labels stay float); how to warp them is the inference path's choice.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from regflow.arrays import to_numpy
from regflow.errors import RegflowError, RequestTooLarge
from regflow.geometry import DEFAULT_MIN_SIZE, check_geometry
from regflow.serving.limits import DEFAULT_LIMITS, ENV_VARS, Limits

ENCODINGS = ("nii.gz", "npy")
REQUIRED_FIELDS = ("fixed", "moving")
OPTIONAL_FIELDS = ("moving_label",)
SETTING_FIELDS = ("refine_steps",)
RESPONSE_FIELDS = ("ddf", "warped", "warped_label")
# gzip levels of answer fields in nii.gz: a DDF's float32 values barely compress (7 % at level 6,
# which took 3/4 of the time to encode an answer and as long as the network on a 48x64x48 pair),
# so its file is stored uncompressed in gzip's framing; the others use GZIP_LEVEL
GZIP_LEVEL = 6
ANSWER_COMPRESSION = {"ddf": 0}
REPORT_FIELDS = ("refine_steps", "time_s")  # answered when a request asks for a setting
MAX_HEADER_BYTES = 2**20  # a NIfTI header with its extensions, before the voxel data

_GZIP_MAGIC = b"\x1f\x8b"
_NPY_MAGIC = b"\x93NUMPY"
_NIFTI_HEADERS = ((nib.Nifti1Header, 348, slice(344, 348), b"n+1\x00"),
                  (nib.Nifti2Header, 540, slice(4, 8), b"n+2\x00"))
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}


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


def encode_volume(array: Any, affine: Any = None, encoding: str = "nii.gz",
                  compresslevel: int = GZIP_LEVEL) -> str:
    """Encode a volume as the base64 text of a ``.nii.gz`` or ``.npy`` file.

    Args:
        array: numpy array or torch tensor, (D, H, W) or channel-first (C, D, H, W) (2-D: (H, W)
            or (C, H, W)). Floats are written as float32, booleans as uint8.
        affine: (4, 4) voxel-to-world matrix in mm for NIfTI (None: identity); ignored for npy.
        encoding: ``"nii.gz"`` (channels moved last, as NIfTI expects) or ``"npy"`` (as given).
        compresslevel: gzip's level for nii.gz (0: stored blocks, still a valid .nii.gz).

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
        payload = gzip.compress(image.to_bytes(), compresslevel=compresslevel, mtime=0)
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


def _inflate(payload: bytes, max_bytes: int, name: str) -> tuple[bytes, bool]:
    """Inflate gzip members, stopping past ``max_bytes``: (at most max_bytes + 1 bytes, more?)."""
    chunks, size = [], 0
    while payload[:2] == _GZIP_MAGIC:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            chunks.append(inflater.decompress(payload, max_bytes - size + 1))
        except zlib.error:
            raise RequestError(f"{name}: corrupt gzip data") from None
        size += len(chunks[-1])
        if size > max_bytes:
            return b"".join(chunks), True
        if not inflater.eof:  # a truncated stream: the reader reports the missing bytes
            break
        payload = inflater.unused_data
    return b"".join(chunks), False


@dataclass(frozen=True)
class _Header:
    """What a file header declares: stored shape and dtype, where the voxel data starts, and the
    voxel-to-world affine (NIfTI: sform, else qform, else the voxel sizes; npy: none)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    fortran_order: bool = False
    affine: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """The file's size: header plus voxel data."""
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def _nifti_header(head: bytes, name: str) -> _Header | None:
    """The header of a single-file NIfTI-1 or NIfTI-2 starting ``head``; None for other data."""
    kind = next(((header_class, size) for header_class, size, magic_at, magic in _NIFTI_HEADERS
                 if len(head) >= size and head[magic_at] == magic), None)
    if kind is None:
        return None
    header_class, size = kind
    try:
        header = header_class(binaryblock=head[:size], check=True)
        shape = tuple(int(length) for length in header.get_data_shape())
        dtype, offset = header.get_data_dtype(), int(header.get_data_offset())
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as exc:  # nibabel raises several types for inconsistent headers
        raise RequestError(f"{name}: unreadable NIfTI header ({exc.__class__.__name__})") from None
    if not size <= offset <= MAX_HEADER_BYTES:
        raise RequestError(f"{name}: NIfTI voxel data offset {offset} outside {size}.."
                           f"{MAX_HEADER_BYTES} bytes")
    return _Header(shape, dtype, offset, affine=affine)


def _npy_header(payload: bytes, name: str) -> _Header:
    stream = io.BytesIO(payload)
    try:
        reader = _NPY_HEADER_READERS.get(np.lib.format.read_magic(stream))
        if reader is None:
            raise ValueError("unsupported .npy format version")
        shape, fortran_order, dtype = reader(stream)
    except (ValueError, OSError, EOFError):
        raise RequestError(f"{name}: unreadable .npy file") from None
    if dtype.hasobject:
        raise RequestError(f"{name}: unreadable .npy file (object arrays are refused)")
    return _Header(tuple(int(length) for length in shape), dtype, stream.tell(), fortran_order)


@dataclass(frozen=True)
class _Layout:
    """How a stored shape maps to (D, H, W) and channels (last for NIfTI, first for npy)."""

    spatial: tuple[int, ...]
    channels: int
    channels_last: bool


def _layout(shape: tuple[int, ...], name: str, channels: bool, encoding: str) -> _Layout:
    if any(length < 1 for length in shape):
        raise RequestError(f"{name}: the header declares shape {shape}")
    layout = None
    if len(shape) == 3:
        layout = _Layout(shape, 1, True)
    elif encoding == "nii.gz" and len(shape) == 5 and shape[3] == 1:  # (D, H, W, 1, C) vectors
        layout = _Layout(shape[:3], shape[4], True)
    elif len(shape) == 4:  # channels where the encoding keeps them; an image's singleton either end
        last, first = _Layout(shape[:3], shape[3], True), _Layout(shape[1:], shape[0], False)
        native, other = (last, first) if encoding == "nii.gz" else (first, last)
        layout = native if channels or native.channels == 1 else other
    if layout is None or (not channels and layout.channels != 1):
        expected = "(D, H, W) or with channels" if channels else "(D, H, W) or a singleton channel"
        raise RequestError(f"{name}: expected a 3-D volume {expected}, got shape {shape}")
    return layout


def _read_nifti(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    image_class = nib.Nifti2Image if data[4:8] == b"n+2\x00" else nib.Nifti1Image
    try:
        image = image_class.from_bytes(data)
        return image.get_fdata(dtype=np.float32), np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for odd files
        raise RequestError(f"{name}: unreadable NIfTI ({exc.__class__.__name__})") from None


def _read_npy(data: bytes, header: _Header) -> np.ndarray:
    array = np.frombuffer(data, header.dtype, math.prod(header.shape), header.offset)
    return array.reshape(header.shape, order="F" if header.fortran_order else "C").astype(
        np.float32)


@dataclass(frozen=True)
class EncodedVolume:
    """One volume as sent, its header checked against the limits; :meth:`decode` reads the data.

    Attributes:
        name: the field, for messages (``"inputs.moving[0]"``).
        payload: the file bytes as sent (still compressed for ``.nii.gz``).
        encoding: ``"nii.gz"`` (also for an uncompressed ``.nii``) or ``"npy"``.
        header: shape, dtype and data offset as the file's header declares them.
        layout: the header's shape as (D, H, W) and channels.
        channels: True: :meth:`decode` returns (C, D, H, W); False: (D, H, W).
    """

    name: str
    payload: bytes
    encoding: str
    header: _Header
    layout: _Layout
    channels: bool

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """(D, H, W) as the header declares it."""
        return self.layout.spatial

    @property
    def affine(self) -> np.ndarray | None:
        """(4, 4) voxel-to-world matrix (mm) as the header declares it; None for npy."""
        return self.header.affine

    def decode(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Inflate (no further than the header's size) and decode the voxel data.

        Returns:
            ``(array float32, affine (4, 4) float64 in mm or None for npy)``; the array is
            (C, D, H, W) or (D, H, W), as asked when the volume was inspected.

        Raises:
            RequestTooLarge: gzip data that inflates past the size its header declares.
            RequestError: truncated or unreadable data, NaN or infinite values.
        """
        data, expected = self.payload, self.header.nbytes
        if data[:2] == _GZIP_MAGIC:
            data, more = _inflate(data, expected, self.name)
            if more:
                raise RequestTooLarge(
                    f"{self.name}: gzip data inflates past the {expected:,} bytes its NIfTI "
                    f"header declares (inflating stops there; {ENV_VARS['max_voxels']} bounds it)")
        if len(data) < expected:
            raise RequestError(f"{self.name}: truncated: {len(data):,} of the {expected:,} bytes "
                               "its header declares")
        if self.encoding == "nii.gz":
            array, affine = _read_nifti(data, self.name)
        else:
            array, affine = _read_npy(data, self.header), None
        spatial, count = self.layout.spatial, self.layout.channels
        if self.layout.channels_last:  # (D, H, W, [1,] C) -> (C, D, H, W)
            array = np.moveaxis(array.reshape(*spatial, count), -1, 0)
        else:
            array = array.reshape(count, *spatial)
        if not np.isfinite(array).all():
            raise RequestError(f"{self.name}: contains NaN or infinite values")
        return (array if self.channels else array[0]), affine


def inspect_volume(text: Any, name: str, channels: bool = False,
                   limits: Limits = DEFAULT_LIMITS) -> EncodedVolume:
    """Check a base64 volume from its header alone: format, shape and the resource limits.

    Only the base64 text is decoded and, for ``.nii.gz``, the first 540 bytes inflated; no voxel
    data is read, so an oversized or hostile volume costs about its own (compressed) size.

    Args:
        text: base64 of a ``.nii.gz`` / ``.nii`` / ``.npy`` file, found by its magic bytes
            (whitespace is ignored).
        name: the field, used in error messages (e.g. ``"inputs.moving[0]"``).
        channels: False: an image, (D, H, W) or with one singleton channel (leading or trailing).
            True: up to ``limits.max_channels`` channels (NIfTI (D, H, W, C), npy (C, D, H, W)).
        limits: voxels and channels per volume (see :class:`regflow.serving.limits.Limits`).

    Returns:
        The volume, ready for :meth:`EncodedVolume.decode`.

    Raises:
        RequestTooLarge: more voxels or channels than ``limits`` allow.
        RequestError: not base64, not a NIfTI or npy volume, unreadable header, a non-numeric
            dtype, or a shape that is not a 3-D volume.
    """
    payload = _b64_bytes(text, name)
    if payload[:2] == _GZIP_MAGIC:
        header = _nifti_header(_inflate(payload, 540, name)[0], name)
        if header is None:
            raise RequestError(f"{name}: gzip data is not a NIfTI file")
        encoding = "nii.gz"
    elif (header := _nifti_header(payload, name)) is not None:
        encoding = "nii.gz"
    elif payload[:6] == _NPY_MAGIC:
        header, encoding = _npy_header(payload, name), "npy"
    else:
        raise RequestError(f"{name}: not a .nii.gz, .nii or .npy volume")
    if header.dtype.kind not in "biuf" or header.dtype.itemsize > 8:
        raise RequestError(f"{name}: dtype {header.dtype} is not a supported number type")
    layout = _layout(header.shape, name, channels, encoding)
    limits.check_volume(name, layout.spatial, layout.channels)
    return EncodedVolume(name, payload, encoding, header, layout, channels)


def decode_volume(text: Any, name: str, channels: bool = False, limits: Limits = DEFAULT_LIMITS
                  ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Decode base64 text of a ``.nii.gz`` / ``.nii`` / ``.npy`` file (limits checked first).

    Args:
        text, name, channels, limits: as for :func:`inspect_volume`.

    Returns:
        ``(array float32, affine (4, 4) float64 in mm or None for npy, encoding)`` with encoding
        ``"nii.gz"`` or ``"npy"`` (the encoding to answer in); the array is (D, H, W), or
        channel-first (C, D, H, W) with ``channels`` (a 3-D volume gets C = 1).

    Raises:
        RequestTooLarge: over ``limits`` (voxels, channels, inflated size).
        RequestError: not base64, not a NIfTI or npy volume, wrong dimensionality, NaN/inf values.
    """
    volume = inspect_volume(text, name, channels, limits)
    return *volume.decode(), volume.encoding


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _column(values: Any, field: str) -> list[Any] | None:
    """A field's values as a list; None when the whole field is null."""
    if hasattr(values, "tolist") and not isinstance(values, str):  # numpy array, pandas Series
        values = values.tolist()
        if isinstance(values, list) and len(values) == 1 and isinstance(values[0], list | tuple):
            values = list(values[0])  # MLflow turns a dict of lists into one row of lists
    if _is_missing(values):
        return None
    if isinstance(values, str):
        return [values]
    if not isinstance(values, Sequence):
        raise RequestError(f"inputs.{field}: expected a list of base64 strings")
    if not values:
        raise RequestError(f"inputs.{field}: empty list")
    return list(values)


def _names(names: Sequence[Any], shown: int = 5, length: int = 40) -> str:
    """Field names for a message, each and their number cut short (they come from the client)."""
    cut = [text if len(text := str(name)) <= length else text[:length] + "..."
           for name in names[:shown]]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(cut) + more


@dataclass(frozen=True)
class EncodedPair:
    """One registration pair of a request, every header checked; :meth:`decode` reads it.

    Attributes:
        index: the pair's place in the request.
        fixed, moving, moving_label: its volumes (no label: None).
        refine_steps: the refinement steps the request asks for (None: the model's own).
    """

    index: int
    fixed: EncodedVolume
    moving: EncodedVolume
    moving_label: EncodedVolume | None
    refine_steps: int | None = None

    @property
    def encoding(self) -> str:
        """The fixed image's encoding, which the answer uses."""
        return self.fixed.encoding

    def decode(self) -> dict[str, Any]:
        """The pair's arrays: see :func:`parse_request` for the keys and shapes."""
        fixed, fixed_affine = self.fixed.decode()
        moving, moving_affine = self.moving.decode()
        moving_label = None if self.moving_label is None else self.moving_label.decode()[0]
        return {"fixed": fixed, "moving": moving, "moving_label": moving_label,
                "fixed_affine": fixed_affine, "moving_affine": moving_affine,
                "encoding": self.encoding}


def _fields(payload: Any) -> Mapping[str, Any]:
    if hasattr(payload, "to_dict") and hasattr(payload, "columns"):  # pandas DataFrame
        payload = {str(column): payload[column] for column in payload.columns}
    if not isinstance(payload, Mapping):
        raise RequestError(f"inputs: expected a mapping of fields, got {type(payload).__name__}")
    if set(payload) == {"inputs"}:
        payload = payload["inputs"]
        if not isinstance(payload, Mapping):
            raise RequestError("inputs: expected a mapping of fields (fixed, moving, ...)")
    return payload


def read_request(payload: Any, limits: Limits = DEFAULT_LIMITS,
                 smallest: int = DEFAULT_MIN_SIZE) -> list[EncodedPair]:
    """Check a serving request without decoding any voxel data.

    Fields, list lengths, the pair count, settings and every volume's header (format, shape,
    geometry, the limits) are checked for the whole request before anything is inflated, so a
    request over a limit is refused at the cost of its own size. :meth:`EncodedPair.decode` then
    reads one pair.

    Args:
        payload: what ``predict`` receives: a dict of field -> list / numpy array, a pandas
            DataFrame with one string column per field, or the raw ``{"inputs": {...}}`` JSON dict.
            Fields: ``fixed``, ``moving`` (required), ``moving_label`` (optional; a null field, or
            a null / NaN entry, means no label for that pair). All lists have the same length.
            Setting: ``refine_steps`` (optional): a non-negative integer for every pair, or a
            list of one per pair (null: the model's own).
        limits: pairs per request, voxels and channels per volume.
        smallest: the smallest size along an axis of a fixed or moving image (voxels).

    Returns:
        One :class:`EncodedPair` per pair, in request order.

    Raises:
        RequestTooLarge: more pairs, voxels or channels than ``limits`` allow.
        GeometryError: an image whose header affine or size cannot be registered (named).
        RequestError: missing/unknown field, unequal list lengths, a bad setting or a bad volume
            (named).
    """
    payload = _fields(payload)
    allowed = REQUIRED_FIELDS + OPTIONAL_FIELDS + SETTING_FIELDS
    unknown = [field for field in payload if field not in allowed]
    if unknown:
        raise RequestError(f"inputs: unknown field(s) {_names(unknown)}; "
                           f"expected {', '.join(allowed)}")
    columns = {field: _column(payload[field], field) for field in REQUIRED_FIELDS +
               OPTIONAL_FIELDS if field in payload}
    columns = {field: values for field, values in columns.items() if values is not None}
    missing = [field for field in REQUIRED_FIELDS if field not in columns]
    if missing:
        raise RequestError(f"inputs: missing field(s) {', '.join(missing)}")
    count = len(columns["fixed"])
    limits.check_pairs(count)
    for field, values in columns.items():
        if len(values) != count:
            raise RequestError(
                f"inputs.{field}: {len(values)} volumes but inputs.fixed has {count}")
    steps = _refine_steps(payload.get("refine_steps"), count)
    return [_read_pair(columns, index, steps[index], limits, smallest) for index in range(count)]


def _refine_steps(values: Any, count: int) -> list[int | None]:
    """``refine_steps`` of every pair: one integer for all, or a list of one per pair."""
    if hasattr(values, "tolist") and not isinstance(values, str):  # numpy (0-d too), pandas
        values = values.tolist()
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], list):
        values = values[0]  # one DataFrame row of lists
    if not isinstance(values, list):
        values = [values] * count
    elif len(values) != count:
        raise RequestError(f"inputs.refine_steps: {len(values)} values but inputs.fixed has "
                           f"{count}; give one integer, or one per pair")
    steps = []
    for value in values:
        if _is_missing(value):
            steps.append(None)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            steps.append(value)
        else:
            shown = str(value)[:40]
            raise RequestError(f"inputs.refine_steps: expected a non-negative integer (0: the "
                               f"network alone), got {shown!r}")
    return steps


def _read_pair(columns: Mapping[str, list[Any]], index: int, refine_steps: int | None,
               limits: Limits, smallest: int) -> EncodedPair:
    fixed = inspect_volume(columns["fixed"][index], f"inputs.fixed[{index}]", limits=limits)
    moving = inspect_volume(columns["moving"][index], f"inputs.moving[{index}]", limits=limits)
    for image in (fixed, moving):
        check_geometry(image.name, image.spatial_shape, image.affine, smallest)
    label_text = columns["moving_label"][index] if "moving_label" in columns else None
    moving_label = None
    if not _is_missing(label_text):
        name = f"inputs.moving_label[{index}]"
        moving_label = inspect_volume(label_text, name, channels=True, limits=limits)
        if moving_label.spatial_shape != moving.spatial_shape:
            raise RequestError(f"{name}: shape {moving_label.spatial_shape} does not match "
                               f"inputs.moving[{index}] shape {moving.spatial_shape}")
    return EncodedPair(index, fixed, moving, moving_label, refine_steps)


def parse_request(payload: Any, limits: Limits = DEFAULT_LIMITS) -> list[dict[str, Any]]:
    """Decode a whole serving request into registration pairs (:func:`read_request`, decoded).

    Args:
        payload, limits: as for :func:`read_request`.

    Returns:
        One dict per pair: ``fixed``, ``moving`` (D, H, W) float32; ``moving_label`` (L, D, H, W)
        float32 as sent (not rounded) or None; ``fixed_affine``, ``moving_affine`` (4, 4) mm or
        None (npy); ``encoding`` of the fixed image (``"nii.gz"`` or ``"npy"``), to answer in.

    Raises:
        RequestTooLarge, RequestError: as :func:`read_request` and :meth:`EncodedVolume.decode`.
    """
    return [pair.decode() for pair in read_request(payload, limits)]


def encode_result(result: Mapping[str, Any], encoding: str) -> dict[str, str]:
    """Encode one pair's outputs (the fields it has) as base64 files.

    Args:
        result: ``ddf`` (ndim, D, H, W) voxels, ``warped`` (D, H, W) or (1, D, H, W), optional
            ``warped_label`` (L, D, H, W) and optional ``affine`` (4, 4) mm (the fixed image's;
            NIfTI outputs carry it); fields that are None are left out.
        encoding: ``"nii.gz"`` or ``"npy"``.
    """
    return {field: encode_volume(result[field], result.get("affine"), encoding,
                                 ANSWER_COMPRESSION.get(field, GZIP_LEVEL))
            for field in RESPONSE_FIELDS if result.get(field) is not None}


def join_results(encoded: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The ``predictions`` mapping from :func:`encode_result` outputs, one per pair, with the
    :data:`REPORT_FIELDS` (settings applied, seconds) of pairs that have them.

    A field no pair has is left out (e.g. no ``ddf`` for the conditional method); a pair lacking
    a field another pair has gets None there.
    """
    fields = [field for field in RESPONSE_FIELDS + REPORT_FIELDS
              if any(field in pair for pair in encoded)]
    return {field: [pair.get(field) for pair in encoded] for field in fields}

