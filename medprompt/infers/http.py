"""HTTP status codes for MedPrompt's user-facing errors.

monailabel 0.8.5 installs no exception handlers, so any exception from an infer task becomes a bare
500 "Internal Server Error". FastAPI does turn ``HTTPException`` into a response with its status and
``{"detail": message}``, so the app raises those; the server keeps serving either way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from fastapi import HTTPException

from medprompt.errors import InputError, MedPromptError, PromptError, WeightsError

STATUS: dict[type[MedPromptError], int] = {
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
