"""How a failed request becomes an answer of MLflow's scoring server: HTTP status, short body, log.

MLflow 3.17's scoring server (``mlflow/pyfunc/scoring_server/__init__.py``) answers an
``MlflowException`` raised in ``predict`` with ``e.get_http_status_code()`` and
``e.serialize_as_json()`` (``_async_catch_mlflow_exception``), but first ``invocations`` rewrites
``e.message`` to ``"Failed to predict data '<the whole request>'. Error: ..."``; any other
exception becomes a 400 carrying its stack trace. No MLflow error code maps to 413 or 422
(``mlflow/exceptions.py``: RESOURCE_LIMIT_EXCEEDED is not in ERROR_CODE_TO_HTTP_STATUS and falls
back to 500, REQUEST_LIMIT_EXCEEDED is 429, INVALID_PARAMETER_VALUE and BAD_REQUEST are 400).
:class:`ServingError` therefore overrides both methods: its status comes from the regflow error
class, and its body holds only the message it was made with, never the rewritten one.
"""

from __future__ import annotations

import json
import logging

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    BAD_REQUEST,
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_LIMIT_EXCEEDED,
    TEMPORARILY_UNAVAILABLE,
)

from regflow.errors import NothingToRegister, RegflowError, RequestTooLarge, ServerBusy

STATUS_OF_ERROR = ((RequestTooLarge, 413), (NothingToRegister, 422), (ServerBusy, 503),
                   (RegflowError, 400))
INTERNAL_MESSAGE = "internal error; see the server log"
MAX_MESSAGE_CHARS = 1000  # a message never carries a volume, whatever a client sends
_ERROR_CODES = {400: BAD_REQUEST, 411: BAD_REQUEST, 413: RESOURCE_LIMIT_EXCEEDED,
                422: INVALID_PARAMETER_VALUE, 500: INTERNAL_ERROR, 503: TEMPORARILY_UNAVAILABLE,
                504: DEADLINE_EXCEEDED}

_logger = logging.getLogger(__name__)


class ServingError(MlflowException):
    """An error answer of ``mlflow models serve``: its own HTTP status and a short JSON body.

    The body is ``{"error_code": "<MLflow code name>", "message": "<message>"}`` with the message
    cut to :data:`MAX_MESSAGE_CHARS`.
    """

    def __init__(self, message: str, status: int) -> None:
        message = message[:MAX_MESSAGE_CHARS]
        super().__init__(message, error_code=_ERROR_CODES[status])
        self.status = status
        self.answer = message  # MLflow rewrites ``message`` to quote the request; this stays

    def get_http_status_code(self) -> int:
        """The HTTP status the scoring server answers with."""
        return self.status

    def serialize_as_json(self) -> str:
        """The response body: error code and the message given here, nothing of the request."""
        return json.dumps({"error_code": self.error_code, "message": self.answer})


def serving_error(exc: BaseException) -> ServingError:
    """Map an exception raised while serving a request to its answer.

    RequestTooLarge -> 413, NothingToRegister -> 422, ServerBusy -> 503, any other RegflowError
    -> 400, each with the error's one-line message (logged as a warning); anything else is a
    bug: 500 with :data:`INTERNAL_MESSAGE`, the traceback logged here on the server side.
    """
    for error_class, status in STATUS_OF_ERROR:
        if isinstance(exc, error_class):
            _logger.warning("request refused with HTTP %d: %.200s", status, exc)
            return ServingError(str(exc), status)
    _logger.error("internal error while serving a request", exc_info=exc)
    return ServingError(INTERNAL_MESSAGE, 500)
