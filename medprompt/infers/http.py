"""HTTP status codes for MedPrompt's user-facing errors.

monailabel 0.8.5 installs no exception handlers, so any exception from an infer task becomes a bare
500 "Internal Server Error". FastAPI does turn ``HTTPException`` into a response with its status and
``{"detail": message}``, so the app raises those; the server keeps serving either way.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from fastapi import HTTPException

from medprompt.errors import (InputError, MedPromptError, NotFoundError, PacsError, PromptError, RequestError,
                              WeightsError, shown)

logger = logging.getLogger(__name__)

STATUS: dict[type[MedPromptError], int] = {
    RequestError: 400,  # a malformed request parameter
    NotFoundError: 404,  # an image id or model that does not exist
    PromptError: 400,  # the request's prompts are empty, unknown or ambiguous
    InputError: 422,  # the image exists but cannot be read as a 3D volume
    WeightsError: 503,  # a weight file is missing on the server: not the client's fault, but fixable
    PacsError: 502,  # the DICOMweb server (PACS) behind this one failed or cannot be reached
}


# Details of the 500s MONAI Label's endpoints raise for a client's mistake, and the status they deserve.
CLIENT_ERRORS_AS_500: tuple[tuple[str, int], ...] = (
    ("Neither Image nor File", 400),  # POST /infer/<model> with no image, file or session
    ("Model File Name NOT configured", 404),  # GET /model/<name> for a model with no file
)


def status_of(error: MedPromptError) -> int:
    """The most specific status for ``error``'s class (400 for other MedPromptErrors)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


@contextmanager
def http_errors() -> Iterator[None]:
    """Re-raise MedPromptError as HTTPException carrying its one-line message."""
    try:
        yield
    except MedPromptError as e:
        raise HTTPException(status_code=status_of(e), detail=str(e)) from e


def raised_by_monailabel_endpoint(error: BaseException) -> bool:
    """True when ``error`` left a MONAI Label endpoint function itself (not code it called).

    Its endpoints run ``request.update(json.loads(params))`` and the like, so ``params`` that is valid
    JSON but not an object (``[1]``, ``"liver"``, ``null``) raised TypeError/ValueError there: a 500
    for the client's mistake. Errors from deeper code (the app, a model) stay 500s.
    """
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and f"{os.sep}monailabel{os.sep}endpoints{os.sep}" in frame.tb_frame.f_code.co_filename


def install_handlers(app: Any, served: Callable[[], ServedNames] | None = None) -> None:
    """Client errors that MONAI Label's own endpoints raise before or around the app become 4xx.

    Its endpoints parse ``params`` with ``json.loads`` and call the datastore directly, so a
    malformed ``params`` or an unknown image id in ``PUT /datastore/label`` was a 500. The handlers
    are added to the running FastAPI app and its middleware stack rebuilt on the next request
    (Starlette copies the handlers when it builds the stack, which happens before the app starts).
    ``served`` adds the checks of RequestGuard.
    """
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def bad_json(request: Any, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": f"'params' is not valid JSON ({exc.msg}, "
                                                                f"character {exc.pos})"})

    async def not_found(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc) or type(exc).__name__})

    async def ours(request: Any, exc: MedPromptError) -> JSONResponse:
        return JSONResponse(status_code=status_of(exc), content={"detail": str(exc)})

    async def http(request: Any, exc: StarletteHTTPException) -> Response:
        """MONAI Label raises 500 for a few requests that are the client's mistake; those become 4xx."""
        status = exc.status_code
        if status == 500:
            status = next((code for start, code in CLIENT_ERRORS_AS_500 if str(exc.detail).startswith(start)), 500)
        return await http_exception_handler(request, StarletteHTTPException(status, exc.detail, exc.headers))

    async def endpoint_type_error(request: Any, exc: Exception) -> Response:
        if raised_by_monailabel_endpoint(exc):
            return JSONResponse(status_code=400, content={"detail": "'params' must be a JSON object, e.g. "
                                                                    "{\"prompts\": [\"liver\"]}"})
        logger.error(f"{request.method} {request.url.path} failed", exc_info=exc)
        return PlainTextResponse("Internal Server Error", status_code=500)

    app.add_exception_handler(json.JSONDecodeError, bad_json)
    app.add_exception_handler(TypeError, endpoint_type_error)
    app.add_exception_handler(ValueError, endpoint_type_error)
    app.add_exception_handler(ImageNotFoundException, not_found)
    app.add_exception_handler(LabelNotFoundException, not_found)
    app.add_exception_handler(MedPromptError, ours)
    app.add_exception_handler(StarletteHTTPException, http)
    app.middleware_stack = None
    if served is not None:
        app.add_middleware(RequestGuard, served=served)


@dataclass
class ServedNames:
    """What the app serves, for RequestGuard: its trainers, scoring methods and infer models, and
    whether its studies live on a DICOMweb server."""

    trainers: set[str]
    scoring: set[str]
    models: set[str]
    dicomweb: bool


class RequestGuard:
    """Requests MONAI Label accepts with a 200 and then fails out of sight, or answers with a 500:

    - ``POST /train/<name>``, ``/scoring/<name>``, ``/batch/infer/<model>`` with a name the app does not
      have: MONAI Label hands them to a background task or child process, which fails later. 404 here.
    - a second training round while one starts or runs: MONAI Label refuses it only once the first
      one's process exists, so a request in the first seconds was silently queued. 429 here, unless the
      client asks ``enqueue=true``.
    - ``/proxy/dicom/...`` on a folder datastore: no PACS to proxy to (a 500). 404 here.
    - ``POST /infer/<model>?output=dicom_seg`` on a folder datastore: MONAI Label refused it only after
      the draft, and that refusal also skipped removing the draft's result file. 400 here, before drafting.
    """

    def __init__(self, app: Any, served: Callable[[], ServedNames]) -> None:
        self.app = app
        self.served = served

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            parts = [p for p in str(scope.get("path", "")).split("/") if p]
            query = str(scope.get("query_string", b""), "latin-1")
            refusal = self._refusal(str(scope.get("method")), parts, query) if parts else None
            if refusal is not None and self._authorised(scope):
                from fastapi.responses import JSONResponse

                await JSONResponse(status_code=refusal[0], content={"detail": refusal[1]})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _authorised(scope: dict) -> bool:
        """With authentication on, a request without a valid token learns nothing here: MONAI Label answers 401."""
        from medprompt.access import token_is_valid

        headers = dict(scope.get("headers") or [])
        return token_is_valid(headers.get(b"authorization", b"").decode("latin-1") or None)

    def _refusal(self, method: str, parts: list[str], query: str) -> tuple[int, str] | None:
        if parts[0] == "proxy":
            if not self.served().dicomweb:
                return 404, "this server's studies are a folder, not a DICOMweb server: there is nothing to proxy"
            return None
        if method != "POST":
            return None
        if parts[0] == "infer" and not self.served().dicomweb and _query_value(query, "output") == "dicom_seg":
            return 400, ("output=dicom_seg needs a DICOMweb datastore (medprompt serve --studies http://...); "
                         "this server's studies are a folder: ask for output=image or output=json")
        kinds = {("train",): ("trainer", "trainers"), ("scoring",): ("scoring method", "scoring"),
                 ("batch", "infer"): ("model", "models")}
        for prefix, (what, field) in kinds.items():
            if tuple(parts[:len(prefix)]) == prefix and len(parts) == len(prefix) + 1:
                known = getattr(self.served(), field)
                name = parts[-1]
                if name not in known:
                    return 404, f"unknown {what} '{shown(name)[1:-1]}'; available: {', '.join(sorted(known)) or 'none'}"
                if prefix == ("train",):
                    return self._busy(query)
        return None

    @staticmethod
    def _busy(query: str) -> tuple[int, str] | None:
        from monailabel.utils.async_tasks.utils import tasks

        if _query_value(query, "enqueue", "false").lower() in ("true", "1", "yes"):
            return None
        busy = [t for t in tasks("train") if t.get("status") in ("SUBMITTED", "RUNNING")]
        if busy:
            task = busy[0]
            return 429, (f"a training round is already {task['status'].lower()} ({task.get('request', {}).get('model')}, "
                         f"since {task.get('start_ts')}); retry when it ends, or pass enqueue=true to queue this one")
        return None


def _query_value(query: str, name: str, default: str = "") -> str:
    """A query parameter as FastAPI reads it: the last of its values."""
    from urllib.parse import parse_qs

    return parse_qs(query).get(name, [default])[-1]
