"""Client of the serving contract: send a NIfTI pair to /invocations, write the answer."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from regflow.data.io import write_nifti
from regflow.errors import DataError, RegflowError
from regflow.redact import redact_url
from regflow.serving.codec import REPORT_FIELDS, RESPONSE_FIELDS, decode_volume


def encode_file(path: Path) -> str:
    """Base64 of a file's bytes (a .nii.gz or .npy is sent as it is)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return base64.b64encode(path.read_bytes()).decode("ascii")


def invocations_endpoint(url: str) -> str:
    """The ``/invocations`` endpoint of a model server's http(s) URL.

    Raises:
        RegflowError: not a URL, a scheme other than http/https, no host or a bad port (the
            message shows the URL with any password masked).
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is what raises for "host:abc" or "host:99999"
    except ValueError as exc:
        raise RegflowError(f"{shown}: not a valid URL ({exc})") from None
    if not parts.scheme:
        raise RegflowError(f"{shown}: not a URL; expected http://HOST:PORT of a model server")
    if parts.scheme not in ("http", "https"):
        raise RegflowError(f"{shown}: unsupported scheme {parts.scheme!r}; expected http or https")
    if not parts.hostname:
        raise RegflowError(f"{shown}: no host; expected http://HOST:PORT of a model server")
    endpoint = url.rstrip("/")
    return endpoint if endpoint.endswith("/invocations") else f"{endpoint}/invocations"


def post_json(url: str, payload: dict, timeout: float) -> dict:
    """POST JSON to the server's /invocations and return the JSON object it answers.

    Raises:
        RegflowError: a bad URL, no answer, an HTTP error status or an answer that is not a
            JSON object; one line, with any password in the URL masked.
    """
    endpoint = invocations_endpoint(url)
    shown = redact_url(endpoint)
    request = urllib.request.Request(endpoint, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300].replace("\n", " ")
        raise RegflowError(f"{shown}: HTTP {exc.code}: {detail}") from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, dropped connections
        reason = getattr(exc, "reason", exc)
        text = str(reason) or reason.__class__.__name__
        raise RegflowError(f"{shown}: no answer ({text})") from None
    except ValueError:
        raise RegflowError(f"{shown}: the answer is not JSON") from None
    if not isinstance(answer, dict):
        raise RegflowError(f"{shown}: the answer is not a JSON object")
    return answer


@dataclass(frozen=True)
class Answer:
    """A registration written by :func:`request_registration`.

    Attributes:
        written: the files, in the order of the answer's fields.
        refine_steps: the refinement steps the server applied (None unless asked for).
        time_s: the seconds the server spent on the pair (None unless steps were asked for).
    """

    written: list[Path]
    refine_steps: int | None = None
    time_s: float | None = None


def request_registration(url: str, fixed: Path, moving: Path, moving_label: Path | None,
                         out_dir: Path, timeout: float = 120.0,
                         refine_steps: int | None = None) -> Answer:
    """Register a pair on a server; write ddf/warped/warped_label NIfTI files into out_dir.

    Every field is decoded before any file is written, so a malformed answer writes nothing;
    each file appears whole (see :func:`regflow.data.io.write_nifti`).

    Args:
        url: the server (``http://HOST:PORT``).
        fixed, moving, moving_label: the files to send as they are.
        out_dir: where to write the answer.
        timeout: seconds to wait for it.
        refine_steps: refinement steps to ask for (None: the served model's own; 0: its network
            alone).

    Returns:
        The files written (the DDF as a (*S, ndim) vector image) and what the server applied.
    """
    inputs: dict[str, Any] = {"fixed": [encode_file(fixed)], "moving": [encode_file(moving)]}
    if moving_label is not None:
        inputs["moving_label"] = [encode_file(moving_label)]
    if refine_steps is not None:
        inputs["refine_steps"] = refine_steps
    predictions = post_json(url, {"inputs": inputs}, timeout).get("predictions", {})
    volumes = {}
    for field in RESPONSE_FIELDS:
        values = predictions.get(field)
        if not values or values[0] is None:
            continue
        array, affine, _ = decode_volume(values[0], f"predictions.{field}[0]", channels=True)
        array = array[0] if array.shape[0] == 1 else array  # (C, *S) -> (*S) or (*S, C)
        volumes[field] = (array.transpose(1, 2, 3, 0) if array.ndim == 4 else array,
                          np.eye(4) if affine is None else affine)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_nifti(out_dir / f"{field}.nii.gz", array, affine)
               for field, (array, affine) in volumes.items()]
    reported = {field: (predictions.get(field) or [None])[0] for field in REPORT_FIELDS}
    return Answer(written, reported["refine_steps"], reported["time_s"])
