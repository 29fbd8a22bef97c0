"""Access: loopback by default, a warning when exposed, and MONAI Label's own authentication working with the app.

MONAI Label's authentication trusts an OpenID Connect realm (Keycloak): it fetches the realm's public
key from ``MONAI_LABEL_AUTH_REALM_URI`` and checks each bearer token's signature and roles. The test
stands up a minimal realm on loopback (public key, discovery document, password grant) with a key
made here, and drives the server through 3D Slicer's own client code as an annotator would.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import requests

from conftest import console_script, find_free_port, launch_server, serving, write_tiny_checkpoint
from medprompt.access import exposure_warning, host_from_argv, is_loopback
from medprompt.cli import main

jwt = pytest.importorskip("jwt")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")

USERS = {"annotator": ("secret", ["monailabel-annotator", "monailabel-user"]),
         "viewer": ("secret", ["monailabel-user"])}


def _key() -> object:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeRealm:
    """A Keycloak realm as MONAI Label talks to it: GET realm -> public key; discovery; password grant."""

    def __init__(self) -> None:
        self.key = _key()
        self.port = find_free_port()
        self.uri = f"http://127.0.0.1:{self.port}/realms/monailabel"
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, content: object, status: int = 200) -> None:
                body = json.dumps(content).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/realms/monailabel":
                    der = realm.key.public_key().public_bytes(serialization.Encoding.DER,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo)
                    self._json({"realm": "monailabel", "public_key": base64.b64encode(der).decode()})
                elif self.path == "/realms/monailabel/.well-known/openid-configuration":
                    self._json({"token_endpoint": f"{realm.uri}/protocol/openid-connect/token"})
                else:
                    self._json({"error": "not found"}, 404)

            def do_POST(self) -> None:  # noqa: N802
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                user = form.get("username", [""])[0]
                if form.get("grant_type") != ["password"] or USERS.get(user, (None,))[0] != form.get("password", [""])[0]:
                    self._json({"error": "invalid_grant"}, 401)
                    return
                self._json({"access_token": realm.token(user), "token_type": "Bearer", "expires_in": 300})

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, user: str, key: object | None = None) -> str:
        claims = {"preferred_username": user, "email": f"{user}@example.org", "name": user,
                  "realm_access": {"roles": USERS[user][1]}, "exp": int(time.time()) + 300}
        return jwt.encode(claims, key or self.key, algorithm="RS256")


@pytest.fixture(scope="module")
def realm() -> Iterator[FakeRealm]:
    fake = FakeRealm()
    yield fake
    fake.server.shutdown()


@pytest.fixture(scope="module")
def secured(realm: FakeRealm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from medprompt.phantoms import write_sample_data

    root = tmp_path_factory.mktemp("secured")
    studies = root / "studies"
    write_sample_data(studies, n=1, shape=(48, 48, 32))
    env = {**os.environ, "MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri,
           "MEDPROMPT_CACHE": str(root / "cache")}
    command = [str(console_script("medprompt")), "serve"]
    with serving(launch_server(root, command, studies, write_tiny_checkpoint(root / "tiny.pt"), env)) as server:
        yield server.url


def _slicer_client(url: str, tmp_path: Path) -> object:
    from test_loop import slicer_client_class

    return slicer_client_class()(url, tmpdir=str(tmp_path))


def test_with_monailabel_auth_only_a_logged_in_annotator_drafts_and_saves(secured: str, realm: FakeRealm,
                                                                          tmp_path: Path) -> None:
    client = _slicer_client(secured, tmp_path)
    assert client.auth_enabled()
    # No token, a forged token (signed with another key), a wrong password: refused, nothing drafted.
    anonymous = requests.post(f"{secured}/infer/medprompt_prior?image=phantom_000&output=json", timeout=60)
    assert anonymous.status_code == 401
    forged = requests.post(f"{secured}/infer/medprompt_prior?image=phantom_000&output=json", timeout=60,
                           headers={"Authorization": f"Bearer {realm.token('annotator', _key())}"})
    assert forged.status_code == 401
    wrong = requests.post(f"{secured}/auth/token", data={"username": "annotator", "password": "guess"}, timeout=60)
    assert wrong.status_code >= 400
    # Unknown trainers are not revealed to a client without a token.
    assert requests.post(f"{secured}/train/nonexistent", json={}, timeout=60).status_code == 401

    client.update_auth(client.auth_token("annotator", "secret"))  # what Slicer's login does
    assert client.auth_valid_token()
    label, params = client.infer("medprompt_prior", "phantom_000", {"prompts": "liver"})
    assert params["label_names"] == {"liver": 1} and Path(label).stat().st_size > 0
    client.save_label("phantom_000", label, params={"label_info": [{"name": "liver", "idx": 1}]})
    headers = {"Authorization": f"Bearer {realm.token('annotator')}"}
    stored = requests.get(f"{secured}/datastore/label?label=phantom_000&tag=final", headers=headers, timeout=60)
    assert stored.status_code == 200 and stored.content
    assert requests.post(f"{secured}/train/nonexistent", json={}, headers=headers, timeout=60).status_code == 404


def test_a_user_without_the_annotator_role_cannot_save_labels(secured: str, realm: FakeRealm, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {realm.token('viewer')}"}
    label = tmp_path / "label.nii.gz"
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.zeros((48, 48, 32), np.uint8), np.eye(4)), label)
    with label.open("rb") as f:
        answer = requests.put(f"{secured}/datastore/label?image=phantom_000&tag=viewer", headers=headers,
                              files={"label": ("label.nii.gz", f)}, timeout=60)
    assert answer.status_code == 403
    assert requests.post(f"{secured}/infer/medprompt_prior?image=phantom_000&output=json", headers=headers,
                         data={"params": "{}"}, timeout=120).status_code == 200  # a user may still draft


@pytest.mark.parametrize("host, exposed", [("127.0.0.1", False), ("::1", False), ("localhost", False),
                                           ("0.0.0.0", True), ("::", True), ("192.168.1.20", True)])
def test_only_loopback_is_quiet_without_authentication(host: str, exposed: bool) -> None:
    assert is_loopback(host) is not exposed
    assert (exposure_warning(host, auth_enabled=False) is not None) is exposed
    assert exposure_warning(host, auth_enabled=True) is None


def test_monailabel_start_server_listens_everywhere_unless_told_so_the_app_knows() -> None:
    assert host_from_argv(["monailabel", "start_server", "--app", "a", "--studies", "s"]) == "0.0.0.0"
    assert host_from_argv(["monailabel", "start_server", "-i", "127.0.0.1"]) == "127.0.0.1"
    assert host_from_argv(["medprompt", "infer", "x", "y"]) is None


def test_serve_defaults_to_loopback_and_warns_on_an_exposed_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    calls: list[dict] = []
    monkeypatch.setattr("medprompt.server.serve", lambda **kw: calls.append(kw) or 0)
    assert main(["serve"]) == 0 and calls[-1]["host"] == "127.0.0.1"

    from monailabel.main import Main

    monkeypatch.undo()
    monkeypatch.setattr(Main, "action_start_server", lambda self, args: None)
    from medprompt.server import serve

    serve(tmp_path, host="0.0.0.0", port=find_free_port())
    assert "without authentication" in capsys.readouterr().err
    serve(tmp_path, host="127.0.0.1", port=find_free_port())
    assert "without authentication" not in capsys.readouterr().err
