"""``medprompt serve``: run MONAI Label's server with the MedPrompt app, in this process.

In-process (rather than a ``monailabel`` subprocess) so Ctrl-C reaches uvicorn directly, which shuts
down gracefully; no child can be orphaned, and the Python running it is always this environment's.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from medprompt.errors import InputError

APP_DIR = Path(__file__).resolve().parent.parent / "apps" / "medprompt"
SAMPLE_DIR = Path("sample_data")


def serve(
    studies: str | os.PathLike | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    conf: dict[str, str] | None = None,
) -> int:
    """Serve ``studies`` (a folder or a DICOMweb URL; None: a phantom datastore in ./sample_data) until Ctrl-C.

    Bad options (unknown model or prompt in ``conf``, missing folder, busy port) raise MedPromptError
    before the server starts, so the CLI can print one line instead of a server traceback.
    """
    from medprompt.cpu_sharing import share_cpu

    share_cpu()  # before torch loads: drafts here and training rounds in subprocesses share the CPU
    from medprompt.configs import task_configs
    from medprompt.schedule import schedule_options

    conf = dict(conf or {})
    task_configs(conf, model_dir=str(APP_DIR / "model"))
    schedule_options(conf)
    studies = _studies(studies)
    _check_port(host, port)
    from medprompt.access import auth_enabled, exposure_warning

    warning = exposure_warning(host, auth_enabled())
    if warning:
        print(warning, file=sys.stderr)

    from monailabel.main import Main
    from monailabel.utils.others.generic import init_log_config

    # MONAI Label writes its logging config to a new temp file on every start and never removes it;
    # made here instead, it is ours to remove when the server stops.
    log_config = init_log_config(None, str(APP_DIR), "app.log")
    main = Main()
    args = main.args_parser().parse_args(
        ["start_server", "--app", str(APP_DIR), "--studies", studies, "--host", host, "--port", str(port),
         "--log_config", log_config]
        + [item for key, value in conf.items() for item in ("--conf", key, str(value))]
    )
    try:
        main.action_start_server(args)
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully and re-raised the signal it caught.
        pass
    finally:
        Path(log_config).unlink(missing_ok=True)
    return 0


def _studies(studies: str | os.PathLike | None) -> str:
    """The datastore argument for MONAI Label; writes the sample phantoms when none is given."""
    if studies is None:
        if not SAMPLE_DIR.exists():
            from medprompt.phantoms import write_sample_data

            print(f"writing a phantom datastore to {SAMPLE_DIR.resolve()}")
            write_sample_data(SAMPLE_DIR, n=4)
        return str(SAMPLE_DIR.resolve())
    text = os.fspath(studies)
    if text.startswith(("http://", "https://")):
        from medprompt.pacs.client import DicomWebClient
        from medprompt.pacs.datastore import default_auth

        DicomWebClient(text, default_auth()).check()  # unreachable or not DICOMweb: one line now, not a traceback
        return text
    if not Path(text).is_dir():
        # MONAI Label would silently create an empty datastore here; a typo deserves a message.
        raise InputError(f"studies folder not found: {text}")
    return str(Path(text).resolve())


def _check_port(host: str, port: int) -> None:
    """Fail with one line when the port is taken (uvicorn would log an error and exit)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another with --port") from None
