"""HTTP status codes for MedPrompt's user-facing errors.

monailabel 0.8.5 installs no exception handlers, so any exception from an infer task becomes a bare
500 "Internal Server Error". FastAPI does turn ``HTTPException`` into a response with its status and
``{"detail": message}``, so the app raises those; the server keeps serving either way.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from fastapi import HTTPException

from medprompt.errors import InputError, MedPromptError, NotFoundError, PromptError, RequestError, WeightsError

STATUS: dict[type[MedPromptError], int] = {
    RequestError: 400,  # a malformed request parameter
    NotFoundError: 404,  # an image id or model that does not exist
    PromptError: 400,  # the request's prompts are empty, unknown or ambiguous
    InputError: 422,  # the image exists but cannot be read as a 3D volume
    WeightsError: 503,  # a weight file is missing on the server: not the client's fault, but fixable
}


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


def install_handlers(app: Any, known_trainers: Callable[[], set[str]] | None = None) -> None:
    """Client errors that MONAI Label's own endpoints raise before or around the app become 4xx.

    Its endpoints parse ``params`` with ``json.loads`` and call the datastore directly, so a
    malformed ``params`` or an unknown image id in ``PUT /datastore/label`` was a 500. The handlers
    are added to the running FastAPI app and its middleware stack rebuilt on the next request
    (Starlette copies the handlers when it builds the stack, which happens before the app starts).
    ``known_trainers`` adds the check of ``POST /train/<name>`` (see UnknownTrainerGuard).
    """
    from fastapi.responses import JSONResponse
    from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

    async def bad_json(request: Any, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": f"'params' is not valid JSON ({exc.msg}, "
                                                                f"character {exc.pos})"})

    async def not_found(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc) or type(exc).__name__})

    async def ours(request: Any, exc: MedPromptError) -> JSONResponse:
        return JSONResponse(status_code=status_of(exc), content={"detail": str(exc)})

    app.add_exception_handler(json.JSONDecodeError, bad_json)
    app.add_exception_handler(ImageNotFoundException, not_found)
    app.add_exception_handler(LabelNotFoundException, not_found)
    app.add_exception_handler(MedPromptError, ours)
    app.middleware_stack = None
    if known_trainers is not None:
        app.add_middleware(UnknownTrainerGuard, known=known_trainers)


class UnknownTrainerGuard:
    """``POST /train/<name>`` with a name no trainer has is a 404 here. MONAI Label hands the request
    to a child process first, so the client got a 200 and the round failed later, out of sight."""

    def __init__(self, app: Any, known: Callable[[], set[str]]) -> None:
        self.app = app
        self.known = known

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("method") == "POST":
            parts = [p for p in str(scope.get("path", "")).split("/") if p]
            if len(parts) == 2 and parts[0] == "train" and parts[1] not in self.known():
                from fastapi.responses import JSONResponse

                detail = f"unknown trainer '{parts[1]}'; available: {', '.join(sorted(self.known())) or 'none'}"
                await JSONResponse(status_code=404, content={"detail": detail})(scope, receive, send)
                return
        await self.app(scope, receive, send)
