"""What ``regflow serve`` runs: MLflow's scoring app for a model, behind admission control for
request bodies, in uvicorn workers that end when their supervisor does.

``mlflow models serve`` starts ``uvicorn`` as a child of its own process; killing that uvicorn
supervisor with SIGKILL leaves its workers (reparented to init) holding the port, so a restart
fails with "Address already in use". ``regflow serve`` instead runs uvicorn in its own process
(:func:`serve_model`): with one worker the server is that process; with several it is their
supervisor, and each worker watches it (:func:`watch_parent`) and shuts down within
:data:`WATCH_S` when it is gone. A restart waits up to :data:`PORT_WAIT_S` for the port. Workers
get :data:`HEALTHCHECK_S` to answer their supervisor's health checks (uvicorn's 5 s replaced
workers that were still loading the model on a busy machine, again and again).

The endpoints are MLflow's own (``/invocations``, ``/ping``, ``/health``, ``/version``), built by
:func:`mlflow.pyfunc.scoring_server.init`. In front of ``POST /invocations``,
:class:`Admission` refuses a body larger than the worker accepts (413, reading it only to drop
it), asks for its length (411 without ``Content-Length``), and reserves the memory parsing it takes
(:data:`PARSE_FACTOR` bytes per byte: MLflow reads the body, parses the JSON and copies every
base64 text into a numpy array of 4-byte characters) from the quarter of ``REGFLOW_MAX_MEMORY``
that bodies may hold, so that concurrent uploads queue (503 after ``REGFLOW_QUEUE_TIMEOUT``, the
body read and dropped first like a refused one's);
the model's own reservation (:mod:`regflow.serving.model`) is kept until the answer has been sent.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

from regflow.errors import RegflowError, RequestTooLarge
from regflow.serving.budget import HELD_UNTIL_ANSWERED, MemoryBudget, mib
from regflow.serving.limits import COMPUTE_SHARE, ENV_VARS, Limits
from regflow.serving.scoring_errors import ServingError, serving_error

MODEL_ENV = "REGFLOW_SERVE_MODEL"  # the model's URI or local folder, for every worker
PARENT_ENV = "REGFLOW_SERVE_PARENT"  # the supervisor's process id, which workers watch
APP = "regflow.serving.app:create_app"
PARSE_FACTOR = 8  # bytes of memory per byte of a request body until the model has decoded it
WATCH_S = 0.5  # how often a worker checks that its supervisor is alive
GRACE_S = 10  # requests in flight get this long to finish when the server stops
HEALTHCHECK_S = 60  # a worker that does not answer its supervisor this long is replaced
PORT_WAIT_S = 15.0  # how long a (re)start waits for its port to be released
DRAIN_BYTES = 2**30  # a refused body is read and dropped up to this size before the answer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Admission:
    """ASGI middleware: request bodies reserve the memory parsing them takes before they are read.

    Args:
        app: the scoring app.
        limits: ``max_memory`` (bodies may hold what the model's computation does not,
            see :data:`regflow.serving.limits.COMPUTE_SHARE`) and ``queue_timeout_s``.
    """

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        share = limits.max_memory - int(COMPUTE_SHARE * limits.max_memory)
        self.bodies = MemoryBudget(share, limits.queue_timeout_s, ENV_VARS["max_memory"])
        self.max_body = share // PARSE_FACTOR

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations" or \
                scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            length = self._body_length(scope)
        except (ServingError, RequestTooLarge) as exc:
            await _drain(receive)  # so that a client still sending reads the answer
            await _answer(send, exc if isinstance(exc, ServingError) else serving_error(exc))
            return
        try:
            reservation = await self.bodies.reserve_async(PARSE_FACTOR * length,
                                                          "the request body")
        except RegflowError as exc:
            await _drain(receive)
            await _answer(send, serving_error(exc))
            return
        held = [reservation]
        token = HELD_UNTIL_ANSWERED.set(held)
        try:
            await self.app(scope, receive, send)
        finally:
            HELD_UNTIL_ANSWERED.reset(token)
            for each in held:
                each.release()

    def _body_length(self, scope: Scope) -> int:
        """The body's ``Content-Length``, checked against what a worker accepts.

        Raises:
            ServingError: 411 without a length; RequestTooLarge: a body over the limit.
        """
        headers = dict(scope["headers"])
        text = headers.get(b"content-length", b"").decode("latin-1").strip()
        if not text.isdigit():
            raise ServingError("the request body: no Content-Length; send it with its length",
                               411)
        length = int(text)
        if length > self.max_body:
            raise RequestTooLarge(
                f"the request body: {mib(length)}, over the {mib(self.max_body)} a server "
                f"worker accepts ({ENV_VARS['max_memory']}: parsing a body takes "
                f"{PARSE_FACTOR} bytes per byte, and bodies may hold a quarter of it)")
        return length


async def _drain(receive: Receive, limit: int = DRAIN_BYTES) -> None:
    """Read and drop a refused body (up to ``limit`` bytes), chunk by chunk: a client that
    sends its whole body before reading (urllib, requests) then gets the answer instead of a
    broken pipe; memory stays at one chunk."""
    received = 0
    while received <= limit:
        message = await receive()
        received += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _answer(send: Send, error: ServingError) -> None:
    """Send an error answer (the body MLflow's scoring server would send for it)."""
    body = error.serialize_as_json().encode()
    await send({"type": "http.response.start", "status": error.get_http_status_code(),
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


_APP_BUILT = threading.Event()  # set once this worker's app is built and it may serve


def watch_parent(parent: int, every_s: float = WATCH_S) -> threading.Thread:
    """Start a daemon thread that ends this worker when process ``parent`` is no longer its
    parent: at once while the worker is still loading its model, else by SIGTERM to itself
    (uvicorn's graceful shutdown, which stops listening at once) and an exit :data:`GRACE_S`
    later if it is still running."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        if _APP_BUILT.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(GRACE_S + 5)
        os._exit(1)

    thread = threading.Thread(target=watch, name="regflow-watch-parent", daemon=True)
    thread.start()
    return thread


def create_app() -> ASGIApp:
    """The ASGI app of one worker (uvicorn's factory): the model of ``$REGFLOW_SERVE_MODEL``
    behind :class:`Admission`; in a worker of a supervisor (``$REGFLOW_SERVE_PARENT``), the
    parent watch starts first."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    parent = int(os.environ.get(PARENT_ENV, "0"))
    if parent and parent != os.getpid():
        watch_parent(parent)
    model = mlflow.pyfunc.load_model(os.environ[MODEL_ENV])
    app = Admission(scoring_server.init(model), Limits.from_env())
    _APP_BUILT.set()
    return app


def wait_for_port(host: str, port: int, timeout_s: float = PORT_WAIT_S) -> None:
    """Return once ``host:port`` can be bound (a stopping server may still hold it).

    Raises:
        RegflowError: still in use after ``timeout_s``, or the address cannot be bound at all.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise RegflowError(f"{host}:{port}: cannot listen there ({exc.strerror})"
                                       ) from None
        if time.monotonic() > deadline:
            raise RegflowError(f"{host}:{port}: address already in use after {timeout_s:g} s "
                               "(another server is listening there)")
        time.sleep(0.2)


def serve_environment(model: str, parent: int) -> dict[str, str]:
    """The variables every worker reads: the model, the supervisor to watch, the request timeout
    (MLflow's default unless set, as ``mlflow models serve`` passes it) and OpenMP's wait policy
    (``PASSIVE`` unless set: torch's threads sleep instead of spinning while they wait for each
    other, which on a CPU shared with other jobs made one registration 4 to 8 times faster)."""
    return {MODEL_ENV: model, PARENT_ENV: str(parent),
            MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name:
                str(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def serve_model(model_uri: str, host: str, port: int, workers: int) -> None:
    """Serve a model with uvicorn in this process until it is stopped (SIGTERM, SIGINT).

    The model is downloaded once (the workers load the local copy), the port waited for, and
    ``workers`` uvicorn workers started (one: this process itself).

    Raises:
        RegflowError: the model cannot be loaded, or the port stays taken.
    """
    import uvicorn

    from regflow.inference import download_model, is_model_uri

    Limits.from_env()  # a bad REGFLOW_* variable is one line here, not a crash in every worker
    local = str(download_model(model_uri)) if is_model_uri(model_uri) else model_uri
    os.environ.update(serve_environment(local, os.getpid()))
    wait_for_port(host, port)
    uvicorn.run(APP, factory=True, host=host, port=port, workers=workers,
                timeout_graceful_shutdown=GRACE_S, timeout_worker_healthcheck=HEALTHCHECK_S)
