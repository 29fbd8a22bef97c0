"""Who may reach the server: loopback by default, a warning when exposed without authentication, and
MONAI Label's own (Keycloak / OpenID Connect) authentication made to work.

MONAI Label 0.8.5 checks bearer tokens with ``jwt.decode(token, key, options=...)`` and no
``algorithms``: PyJWT 2 refuses that call, so with ``MONAI_LABEL_AUTH_ENABLE=true`` every token,
valid or not, was a 401 and no client could log in. ``enable_token_check`` replaces that one
function with the same check plus the algorithm list (asymmetric ones only: the key is the realm's
public key, so an HMAC token signed with it must never pass).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
# Keycloak signs with RS256 by default; realms may choose another asymmetric algorithm.
TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
MONAILABEL_DEFAULT_HOST = "0.0.0.0"  # what ``monailabel start_server`` listens on unless told otherwise


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, auth_enabled: bool) -> str | None:
    """The warning to print when the server listens beyond this machine with no authentication."""
    if is_loopback(host) or auth_enabled:
        return None
    return (f"warning: listening on {host} without authentication: anyone who can reach this machine can read "
            "the studies, overwrite labels and start training. Use --host 127.0.0.1 (an SSH tunnel for remote "
            "annotators), or enable MONAI Label's authentication (MONAI_LABEL_AUTH_ENABLE=true, "
            "MONAI_LABEL_AUTH_REALM_URI=<your Keycloak realm>); see the README's 'Access' section.")


def host_from_argv(argv: Sequence[str]) -> str | None:
    """The host ``monailabel start_server`` was given (``-i``/``--host``), its default, or None if not serving."""
    if "start_server" not in argv:
        return None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg in ("-i", "--host") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return MONAILABEL_DEFAULT_HOST


def auth_enabled() -> bool:
    from monailabel.config import settings

    return bool(settings.MONAI_LABEL_AUTH_ENABLE)


def token_is_valid(authorization: str | None) -> bool:
    """Whether an ``Authorization: Bearer ...`` header passes MONAI Label's check (True when auth is off)."""
    if not auth_enabled():
        return True
    if not authorization or not authorization.lower().startswith("bearer "):
        return False
    from monailabel.endpoints.user import auth

    try:
        auth.from_token(authorization.split(" ", 1)[1].strip())
    except Exception:
        return False
    return True


def enable_token_check() -> None:
    """Make MONAI Label's bearer-token check work with PyJWT 2 (see the module docstring). Idempotent."""
    from monailabel.endpoints.user import auth

    if getattr(auth.from_token, "_medprompt", False):
        return

    def from_token(token: str) -> Any:
        import jwt
        from monailabel.config import settings

        if not settings.MONAI_LABEL_AUTH_ENABLE:
            return auth.DEFAULT_USER
        try:
            key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
        except Exception as error:  # requests' errors, a realm answering something else
            from fastapi import HTTPException

            raise HTTPException(status_code=503, detail=f"the authentication server "
                                f"{settings.MONAI_LABEL_AUTH_REALM_URI} cannot be reached ({type(error).__name__})")
        payload = jwt.decode(token, key, algorithms=TOKEN_ALGORITHMS,
                             options={"verify_signature": True, "verify_aud": False, "verify_exp": True})
        roles: Any = payload
        for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
            roles = roles.get(part) if isinstance(roles, dict) else None
        return auth.User(username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or ""),
                         email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                         name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
                         roles=list(roles) if isinstance(roles, list) else [])

    from_token._medprompt = True  # type: ignore[attr-defined]
    auth.from_token = from_token
