"""Errors whose message is meant for the user: one line naming the problem.

The CLI prints ``str(error)`` without a traceback; the server maps them to HTTP 4xx.
"""

import reprlib

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def shown(value: object) -> str:
    """A user-supplied value quoted in an error message: its repr, cut to a few dozen characters, one line.

    Values come from files and requests: a 100k-character prompt or a nested YAML bomb must not be
    echoed back whole, nor a newline split the message.
    """
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= 100 else text[:97] + "..."


def one_line(error: BaseException) -> str:
    """A library's exception message for a one-line error: whitespace collapsed, cut at 160 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class MedPromptError(Exception):
    """Base class for problems caused by the user's input or environment, not by a bug."""


class InputError(MedPromptError):
    """A volume or label map that cannot be read or is not a 3D image."""


class PromptError(MedPromptError):
    """An unknown, empty or ambiguous prompt, or a malformed prompt file."""


class WeightsError(MedPromptError):
    """A model weight file that is missing or unusable."""


class RequestError(MedPromptError):
    """A malformed request parameter (clicks outside the image, a box with no pixels, a bad slice)."""


class NotFoundError(MedPromptError):
    """Something the request names (an image id, a model) that does not exist here."""


class PacsError(MedPromptError):
    """A DICOMweb server (PACS) that cannot be reached, or failed or refused a request."""
