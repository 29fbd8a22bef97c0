"""A refused upload leaves no copy behind on the server.

MONAI Label's upload endpoints (``POST /infer/<model>`` with a file or label, ``PUT /datastore/image``,
``PUT /datastore/label``) copy the upload to a temporary file and queue its removal as a background
task of the response. A request that fails never sends that response, so the tasks never ran and
the copy stayed in the server's temp folder: every refused upload (a file that is not a volume, a
label on the wrong grid) kept its full size on disk. :func:`install` wraps the three endpoint
functions so that, when one raises, the removals it queued run before the error goes out.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

_WRAPPED = "_medprompt_removes_uploads"


def install() -> None:
    """Wrap MONAI Label's upload endpoints (they call these module functions by name, so this reaches them)."""
    from monailabel.endpoints import datastore, infer
    from monailabel.utils.others.generic import remove_file

    for module, name in ((infer, "run_inference"), (datastore, "add_image"), (datastore, "save_label")):
        endpoint = getattr(module, name)
        if not getattr(endpoint, _WRAPPED, False):
            setattr(module, name, removing_uploads(endpoint, remove_file))


def removing_uploads(endpoint: Callable[..., Any], remove: Callable[[str], None]) -> Callable[..., Any]:
    """``endpoint(background_tasks, ...)``, running the ``remove`` tasks it queued if it raises."""
    @functools.wraps(endpoint)
    def run(background_tasks: Any, *args: Any, **kwargs: Any) -> Any:
        queued = len(background_tasks.tasks)
        try:
            return endpoint(background_tasks, *args, **kwargs)
        except BaseException:
            for task in background_tasks.tasks[queued:]:
                if task.func is remove:
                    with contextlib.suppress(OSError):
                        task.func(*task.args, **task.kwargs)
            raise

    setattr(run, _WRAPPED, True)
    return run
