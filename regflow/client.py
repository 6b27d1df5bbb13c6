"""Client of the serving contract: send a NIfTI pair to /invocations, write the answer."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from regflow.codec import decode_volume
from regflow.data.io import write_nifti
from regflow.errors import DataError, RegflowError


def encode_file(path: Path) -> str:
    """Base64 of a file's bytes (a .nii.gz or .npy is sent as it is)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return base64.b64encode(path.read_bytes()).decode("ascii")


def post_json(url: str, payload: dict, timeout: float) -> dict:
    """POST JSON and parse the JSON answer; HTTP errors become one-line RegflowErrors."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/invocations"):
        endpoint += "/invocations"
    request = urllib.request.Request(endpoint, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300].replace("\n", " ")
        raise RegflowError(f"{endpoint}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise RegflowError(f"{endpoint}: no answer ({exc})") from None


def request_registration(url: str, fixed: Path, moving: Path, moving_label: Path | None,
                         out_dir: Path, timeout: float = 120.0) -> list[Path]:
    """Register a pair on a server; write ddf/warped/warped_label NIfTI files into out_dir.

    Returns:
        The written files (the DDF as a (*S, ndim) vector image).
    """
    inputs = {"fixed": [encode_file(fixed)], "moving": [encode_file(moving)]}
    if moving_label is not None:
        inputs["moving_label"] = [encode_file(moving_label)]
    predictions = post_json(url, {"inputs": inputs}, timeout).get("predictions", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".request-", dir=out_dir))
    try:
        written = []
        for field, values in predictions.items():
            if not values or values[0] is None:
                continue
            array, affine, _ = decode_volume(values[0], f"predictions.{field}[0]",
                                             channels=True)
            array = array[0] if array.shape[0] == 1 else array
            if array.ndim == 4:
                array = array.transpose(1, 2, 3, 0)
            write_nifti(staging / f"{field}.nii.gz", array,
                        np.eye(4) if affine is None else affine)
            written.append(out_dir / f"{field}.nii.gz")
            (staging / f"{field}.nii.gz").replace(written[-1])
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
