"""End to end through MONAI Label's own Python client against ``medprompt serve`` (see conftest.server)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from medprompt.catalog import SYNAPSE8
from medprompt.configs import task_configs
from medprompt.errors import InputError, MedPromptError
from medprompt.evaluation import evaluate
from medprompt.io.volume import load_labelmap, load_volume, read_label_names
from medprompt.server import serve

if TYPE_CHECKING:
    from conftest import RunningServer

REPO_ROOT = Path(__file__).resolve().parents[1]
MEDPROMPT = Path(sys.executable).parent / "medprompt"  # the console script in this venv
MODEL = "medprompt_prior"
IMAGE = "phantom_000"


@pytest.fixture
def client(server: RunningServer, tmp_path: Path) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path))


def liver_dice(server: RunningServer, label_file: str, names: dict[str, int]) -> float:
    """Dice of the draft's liver against the phantom's exact liver mask."""
    labels = nib.load(label_file)
    ref, ref_affine, ref_names = load_labelmap(server.studies / "reference" / f"{IMAGE}.nii.gz")
    result = evaluate(np.asarray(labels.dataobj), labels.affine, names, ref, ref_affine, ref_names)
    return next(s.dice for s in result.scores if s.name == "liver")


def error_status(error: MONAILabelClientException) -> tuple[int, str]:
    """(HTTP status, body) from the client's 'Status: N; Response: ...' message."""
    match = re.match(r"Status: (\d+); Response: (.*)", error.msg, re.S)
    assert match, f"unexpected client error: {error.msg}"
    return int(match.group(1)), match.group(2)


def test_info_lists_the_prior_model_labels_and_strategies(client: MONAILabelClient) -> None:
    info = client.info()
    model = info["models"][MODEL]
    assert model["labels"] == {name: value for value, name in enumerate(SYNAPSE8, start=1)}
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["config"]["prompts"].split(",") == list(SYNAPSE8)
    assert {"random", "first"} <= set(info["strategies"])
    # The three phantoms are the datastore; their reference masks (in reference/) are not images.
    assert info["datastore"]["total"] == 3


def test_default_prompts_draft_the_synapse8_on_the_image_grid(server: RunningServer, client: MONAILabelClient) -> None:
    label_file, params = client.infer(MODEL, IMAGE, {})
    assert params["label_names"] == {name: value for value, name in enumerate(SYNAPSE8, start=1)}
    assert params["prompts_resolved"] == {name: name for name in SYNAPSE8}
    image = load_volume(server.studies / f"{IMAGE}.nii.gz")
    labels = nib.load(label_file)
    assert labels.shape == image.data.shape
    np.testing.assert_allclose(labels.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, *range(1, len(SYNAPSE8) + 1)}
    assert liver_dice(server, label_file, params["label_names"]) > 0.5


@pytest.mark.parametrize("prompts", [["liver", "spleen"], "liver, spleen"], ids=["list", "comma-string"])
def test_custom_prompts_name_the_labels_in_prompt_order(
    server: RunningServer, client: MONAILabelClient, prompts: list[str] | str
) -> None:
    label_file, params = client.infer(MODEL, IMAGE, {"prompts": prompts})
    assert params["label_names"] == {"liver": 1, "spleen": 2}
    assert params["prompts_resolved"] == {"liver": "liver", "spleen": "spleen"}
    values = set(np.unique(np.asarray(nib.load(label_file).dataobj)))
    assert values <= {0, 1, 2} and {1, 2} <= values
    assert liver_dice(server, label_file, params["label_names"]) > 0.5


def test_ohif_keeping_the_model_indices_gets_each_class_at_its_info_value(
    server: RunningServer, client: MONAILabelClient
) -> None:
    """OHIF's panel names values by /info's labels and sends restore_label_idx=false: liver must come back as
    /info's liver (5), not as 1, which OHIF would show as the aorta; a class /info lacks goes after them."""
    info = client.info()["models"][MODEL]["labels"]
    label_file, params = client.infer(MODEL, IMAGE, {"prompts": "liver,spleen,inferior vena cava",
                                                     "restore_label_idx": False})
    extra = max(info.values()) + 1
    assert params["label_names"] == {"liver": info["liver"], "spleen": info["spleen"], "inferior_vena_cava": extra}
    values = set(np.unique(np.asarray(nib.load(label_file).dataobj)).tolist())
    assert {info["liver"], info["spleen"]} <= values <= {0, info["liver"], info["spleen"], extra}
    assert liver_dice(server, label_file, params["label_names"]) > 0.5


def test_saved_label_is_stored_and_active_learning_moves_on(client: MONAILabelClient, tmp_path: Path) -> None:
    images = sorted(client.datastore()["objects"])
    first = client.next_sample("first", {})["id"]
    assert first in images
    label_file, _ = client.infer(MODEL, first, {"prompts": ["liver"]})

    client.save_label(first, label_file, tag="final")

    stored = client.download_label(first, "final")
    np.testing.assert_array_equal(np.asarray(nib.load(stored).dataobj), np.asarray(nib.load(label_file).dataobj))
    unlabeled = [i for i in images if "final" not in client.datastore()["objects"][i]["labels"]]
    assert first not in unlabeled
    assert client.next_sample("first", {})["id"] == unlabeled[0]
    assert client.next_sample("random", {})["id"] in unlabeled


@pytest.mark.parametrize(
    ("image", "params", "status", "named"),
    [
        (IMAGE, {"prompts": ["liver", "hyperdrive"]}, 400, "hyperdrive"),
        (IMAGE, {"prompts": []}, 400, "empty"),
        (IMAGE, {"prompts": " , "}, 400, "empty"),
        (IMAGE, {"prompts": 7}, 400, "prompts"),
        ("no_such_image", {}, 404, "no_such_image"),
    ],
    ids=["unknown-prompt", "empty-list", "blank-string", "not-a-list", "unknown-image-id"],
)
def test_bad_requests_get_4xx_naming_the_problem_and_the_server_keeps_serving(
    client: MONAILabelClient, image: str, params: dict, status: int, named: str
) -> None:
    with pytest.raises(MONAILabelClientException) as caught:
        client.infer(MODEL, image, params)
    code, body = error_status(caught.value)
    assert code == status
    assert named in json.loads(body)["detail"]
    assert MODEL in client.info()["models"]


def test_client_errors_around_the_app_are_4xx_and_nothing_leaves_the_datastore(
    server: RunningServer, tmp_path: Path
) -> None:
    """What MONAI Label's endpoints raised as 500s (or, for a trainer, accepted and failed out of sight):
    an unknown model, strategy or trainer, ``params`` that is not JSON, a label for an unknown image or
    under a tag that climbs out of the datastore."""
    import requests

    def infer(model: str, params: str) -> requests.Response:
        return requests.post(f"{server.url}/infer/{model}?image={IMAGE}&output=json", data={"params": params},
                             timeout=120)

    unknown = infer("medclip_sam", "{}")
    assert unknown.status_code == 404 and "medclip_sam" in unknown.json()["detail"]
    assert MODEL in unknown.json()["detail"]  # the available models are named
    bad_json = infer(MODEL, "{prompts: liver")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["detail"]
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), label)
    for query, status in (("image=../../escape", 404), (f"image={IMAGE}&tag=../../escape", 400),
                          (f"image={IMAGE}&tag=%2Ftmp%2Fabs", 400), ("image=%00", 404)):
        with label.open("rb") as f:
            answer = requests.put(f"{server.url}/datastore/label?{query}", files={"label": ("label.nii.gz", f)},
                                  timeout=60)
        assert answer.status_code == status, (query, answer.status_code, answer.text)
    strategy = requests.post(f"{server.url}/activelearning/most_confusing", json={}, timeout=60)
    assert strategy.status_code == 404 and "most_confusing" in strategy.json()["detail"]
    trainer = requests.post(f"{server.url}/train/medclip_sam", json={}, timeout=60)
    assert trainer.status_code == 404 and "medprompt_finetune" in trainer.json()["detail"]
    # labels/<tag> with tag ../../escape would have been <server root>/escape.
    assert not (server.studies.parent / "escape").exists() and not Path("/tmp/abs").exists()
    assert not list(server.studies.parent.rglob("escape*"))
    assert MODEL in requests.get(f"{server.url}/info/", timeout=30).json()["models"]  # still serving


def test_unreadable_upload_gets_422_and_the_server_keeps_serving(client: MONAILabelClient, tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(MONAILabelClientException) as caught:
        client.infer(MODEL, "", {}, file=str(broken))
    code, body = error_status(caught.value)
    assert code == 422
    assert json.loads(body)["detail"]
    assert MODEL in client.info()["models"]


def test_app_loads_the_medprompt_package_not_its_own_folder_offline_and_untracked(tmp_path: Path) -> None:
    """Load the app the way MONAI Label does, from the worst working directory, with networking disabled,
    on a local and on a DICOMweb datastore.

    From apps/, the app folder (also named medprompt) is a namespace-package candidate that hides an
    editable install of the package; main.py must still import this checkout's ``medprompt``.
    """
    from medprompt.phantoms import write_sample_data

    write_sample_data(tmp_path / "studies", n=1, shape=(16, 16, 12))
    script = f"""
import json, socket, sys
attempts = []
def offline(self, address, *args, **kwargs):
    attempts.append(list(address)[:2])
    raise OSError("network access during app start-up")
socket.socket.connect = offline
from monailabel.interfaces.utils.app import app_instance
app = app_instance(app_dir={str(REPO_ROOT / "apps" / "medprompt")!r}, studies={str(tmp_path / "studies")!r}, conf={{}})
# A DICOMweb datastore made MONAI Label's base app download dcmqi from GitHub; ours only asks the PACS
# (here unreachable: one error naming it, before anything else is fetched).
from medprompt.errors import PacsError
try:
    app_instance(app_dir={str(REPO_ROOT / "apps" / "medprompt")!r}, studies="http://127.0.0.1:9/dicom-web", conf={{}})
    dicomweb = "started"
except PacsError as error:
    dicomweb = str(error)
import medprompt
from monailabel.config import settings
print(json.dumps({{"package": medprompt.__file__, "models": sorted(app.info()["models"]),
                   "sam2": any(m.startswith("monailabel.sam2") for m in sys.modules),
                   "tracking": settings.MONAI_LABEL_TRACKING_ENABLED,
                   "dicomweb": dicomweb, "attempts": attempts}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT / "apps", env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(loaded["package"]) == REPO_ROOT / "medprompt" / "__init__.py"
    assert loaded["models"] == ["medprompt", "medprompt_click", "medprompt_click_3d", MODEL]
    assert loaded["sam2"] is False
    assert loaded["tracking"] is False  # MONAI Label's default is on (MLflow)
    assert loaded["dicomweb"].startswith("cannot reach the DICOMweb server http://127.0.0.1:9/dicom-web")
    assert loaded["attempts"] == [["127.0.0.1", 9]]  # the PACS itself, nothing downloaded


def test_server_drafts_a_real_dicom_series_on_its_own_grid(
    server: RunningServer, client: MONAILabelClient, real_data: Path
) -> None:
    """A DICOM series folder (JPEG 2000, 20 slices) put in the studies folder, drafted through the server by
    its path, overlays the study. (A path outside the studies folder is a 404: tests/test_bad_inputs.py.)"""
    import shutil

    case = real_data / "ct_abdomen_b_dicom"
    series = server.studies / "dicom_series" / "ct_abdomen_b"
    if not series.exists():
        shutil.copytree(case / "dicom", series)
    label_file, params = client.infer(MODEL, str(series), {"prompts": ["liver"]})
    labels = nib.load(label_file)
    image = load_volume(case / "dicom")
    assert labels.shape == image.data.shape == (512, 512, 20)
    np.testing.assert_allclose(labels.affine, image.affine, atol=1e-3)
    ref, ref_affine, _ = load_labelmap(case / "label.nii.gz")
    result = evaluate(np.asarray(labels.dataobj), labels.affine, params["label_names"],
                      ref, ref_affine, read_label_names(case / "labels.json"))
    # The reference is stored LAS, the draft on the DICOM grid: overlap proves the orientations agree.
    assert result.scores[0].name == "liver" and result.scores[0].dice > 0.5


def test_conf_prompts_set_the_default_prompts_and_labels(tmp_path: Path) -> None:
    infer = task_configs({"prompts": "liver, spleen"}, str(tmp_path))[MODEL].infer()
    assert infer.info()["labels"] == {"liver": 1, "spleen": 2}
    assert infer.info()["config"]["prompts"] == "liver,spleen"


def test_both_models_refine_with_litemedsam_by_default_and_conf_turns_it_off(tmp_path: Path) -> None:
    default = task_configs({}, str(tmp_path))
    assert {name: default[name].infer().info()["config"]["refine"] for name in ("medprompt_prior", "medprompt")} == \
        {"medprompt_prior": "sam", "medprompt": "sam"}
    off = task_configs({"refine": "none", "models": "prior"}, str(tmp_path))[MODEL].infer()
    assert off.info()["config"]["refine"] == "none"


def test_a_request_can_ask_for_litemedsam_and_the_response_says_which_stage_drew_each_class(
    server: RunningServer, client: MONAILabelClient,
) -> None:
    # The session server defaults to refine none (conftest); one request asks for the segmenter.
    label_file, params = client.infer(MODEL, IMAGE, {"prompts": ["liver"], "refine": "sam"})
    assert list(params["stages"]) == ["liver"] and params["stages"]["liver"].startswith("prior + LiteMedSAM")
    assert liver_dice(server, label_file, params["label_names"]) > 0.5
    _, plain = client.infer(MODEL, IMAGE, {"prompts": ["liver"]})
    assert plain["stages"] == {"liver": "prior"}
    with pytest.raises(MONAILabelClientException) as bad:
        client.infer(MODEL, IMAGE, {"prompts": ["liver"], "refine": "magic"})
    status, body = error_status(bad.value)
    assert status == 400 and "refine" in body


@pytest.mark.parametrize(
    ("conf", "named"),
    [({"models": "medclip_sam"}, "medclip_sam"), ({"models": " "}, "models"), ({"prompts": "tiramisu"}, "tiramisu"),
     ({"refine": "medsam2"}, "medsam2")],
    ids=["unknown-model", "no-model", "unknown-prompt", "unknown-refinement"],
)
def test_bad_conf_is_refused_by_name(tmp_path: Path, conf: dict[str, str], named: str) -> None:
    with pytest.raises(MedPromptError, match=named):
        task_configs(conf, str(tmp_path))


def test_serve_refuses_a_missing_folder_and_a_busy_port_before_starting(server: RunningServer, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        serve(tmp_path / "missing")
    port = int(server.url.rsplit(":", 1)[1])
    done = subprocess.run(
        [str(MEDPROMPT), "serve", "--studies", str(tmp_path), "--port", str(port)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert f"127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_while_a_study_is_encoded_in_the_background_stops_cleanly(tmp_path: Path) -> None:
    """Next Sample starts LiteMedSAM's encoder on the study in a background thread; Ctrl-C in the middle used
    to abort the process (exit 134, 'terminate called without an active exception'). ``serving`` requires
    exit code 0; the log shows the encoding was under way and stopped."""
    import urllib.request

    from conftest import console_script, launch_server, serving, write_tiny_checkpoint
    from medprompt.phantoms import write_sample_data

    studies = tmp_path / "studies"
    write_sample_data(studies, n=1)
    env = {**os.environ, "MEDPROMPT_CACHE": str(tmp_path / "cache")}
    command = [str(console_script("medprompt")), "serve", "--conf", "models", "prior"]
    server = launch_server(tmp_path, command, studies, write_tiny_checkpoint(tmp_path / "tiny.pt"), env, refine="sam")
    with serving(server):
        request = urllib.request.Request(f"{server.url}/activelearning/first", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.load(response)["id"] == "phantom_000"
        time.sleep(3)  # inside the encoder: a 64-slice phantom takes tens of seconds
    assert "stopped after" in server.log.read_text(errors="replace")
