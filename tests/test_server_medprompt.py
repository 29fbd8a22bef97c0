"""The ``medprompt`` model and its ``medprompt_zero_shot`` trainer, end to end through MONAI Label's client.

The session server (conftest.server) serves a tiny random checkpoint; a second server, started with
MONAI Label's own launcher, has no checkpoint and asks for BiomedCLIP weights that are not there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import console_script, launch_server, serving, write_tiny_checkpoint
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from medprompt.catalog import SYNAPSE8
from medprompt.configs import task_configs
from medprompt.configs.medprompt import Checkpoints
from medprompt.drafts import draft
from medprompt.errors import InputError, WeightsError
from medprompt.io.volume import load_volume
from medprompt.trainers.round_task import request_int
from test_server import error_status

if TYPE_CHECKING:
    from conftest import RunningServer

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINER = "medprompt_zero_shot"
WITHIN_S = 5.0  # the bound for reporting missing weights at start-up


@pytest.fixture
def client(server: RunningServer, tmp_path: Path) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path))


@pytest.fixture(scope="module")
def small_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x36x20 CT at 2.5 mm (the network's own grid), stored LPS: a draft takes a fraction of a second."""
    data = np.random.default_rng(1).normal(40, 300, size=(40, 36, 20)).astype(np.float32)
    affine = np.diag([-2.5, -2.5, 2.5, 1.0])
    path = tmp_path_factory.mktemp("volume") / "small_ct.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def info(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/info/", timeout=10) as response:
        return json.load(response)


# -- the healthy session server -------------------------------------------------------------------

def test_info_lists_medprompt_beside_the_prior_and_its_trainer(client: MONAILabelClient) -> None:
    got = client.info()
    assert {"medprompt", "medprompt_prior"} <= set(got["models"])
    model = got["models"]["medprompt"]
    assert model["labels"] == {name: value for value, name in enumerate(SYNAPSE8, start=1)}
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["config"]["prompts"].split(",") == list(SYNAPSE8)
    trainer = got["trainers"][TRAINER]
    assert trainer["config"]["steps"] >= 1 and trainer["config"]["text_encoder"] == "minilm"


def test_medprompt_drafts_the_request_prompts_with_the_served_checkpoint(
    server: RunningServer, client: MONAILabelClient, small_volume: Path
) -> None:
    label_file, params = client.infer("medprompt", "", {"prompts": "liver, spleen"}, file=str(small_volume))
    assert params["label_names"] == {"liver": 1, "spleen": 2}
    assert params["prompts_resolved"] == {"liver": "liver", "spleen": "spleen"}
    checkpoint = params["checkpoint"]
    assert Path(checkpoint["path"]) == server.checkpoint  # no round yet: the start checkpoint
    assert checkpoint["mtime"] == pytest.approx(server.checkpoint.stat().st_mtime)

    labels = nib.load(label_file)
    image = load_volume(small_volume)
    assert labels.shape == image.data.shape
    np.testing.assert_allclose(labels.affine, image.affine, atol=1e-4)
    # The same checkpoint run here must give the same draft: the server serves that network, on the input grid.
    expected = draft(image, ["liver", "spleen"], model="medprompt", checkpoint=server.checkpoint, refine="none").labels
    served = np.asarray(labels.dataobj)
    assert len(np.unique(expected)) > 1  # a non-trivial map, so agreement means something
    assert np.mean(served != expected) < 1e-3  # thread counts may move a voxel sitting exactly at 0.5


def test_a_zero_shot_round_trains_on_the_images_only_and_the_next_draft_uses_it(
    server: RunningServer, client: MONAILabelClient, small_volume: Path, tmp_path: Path
) -> None:
    # A "label" that breaks anything reading it, put in the folder by hand (an upload would be refused):
    # the round must not look at labels at all.
    final = server.studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    (final / "phantom_001.nii.gz").write_bytes(b"not a label map")
    images = sorted(client.datastore()["objects"])

    client.train_start(TRAINER, {"steps": 2, "model_config": "tiny"})
    deadline = time.monotonic() + 60
    while not client.train_status(check_if_running=True):  # 404 (False) until the child process runs
        assert time.monotonic() < deadline, "the training round never started"
        time.sleep(0.2)
    # MONAI Label refuses a second round while one runs.
    with pytest.raises(MONAILabelClientException) as caught:
        client.train_start(TRAINER, {"steps": 2, "model_config": "tiny"})
    assert error_status(caught.value)[0] == 429
    while (task := client.train_status())["status"] in ("SUBMITTED", "RUNNING"):
        assert time.monotonic() < deadline + 120, f"round still running: {task.get('details')}"
        time.sleep(0.5)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    assert any("step 2/2" in line for line in task["details"])  # progress reaches the client as lines

    trained = server.model_dir / "medprompt" / "medprompt.pt"
    stats = client.info()["train_stats"][TRAINER]
    assert Path(stats["checkpoint"]) == trained and stats["steps"] == 2 and stats["images"] == len(images)
    meta = torch.load(trained, map_location="cpu", weights_only=False)
    assert sorted(name.split(".")[0] for name in meta["trained_on"]) == images
    assert meta["step"] == 2
    assert not list((server.model_dir / "medprompt" / "work").glob("medprompt.pt*"))  # nothing left to resume

    _, params = client.infer("medprompt", "", {"prompts": ["liver"]}, file=str(small_volume))
    assert Path(params["checkpoint"]["path"]) == trained
    assert params["checkpoint"]["mtime"] == pytest.approx(trained.stat().st_mtime)
    assert params["checkpoint"]["mtime"] > server.checkpoint.stat().st_mtime


# -- a server without weights --------------------------------------------------------------------

@pytest.fixture(scope="module")
def weightless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """``monailabel start_server --conf text_encoder biomedclip`` with no checkpoint and an empty HF cache."""
    from medprompt.phantoms import write_sample_data

    root = tmp_path_factory.mktemp("weightless")
    studies = root / "studies"
    write_sample_data(studies, n=1, shape=(48, 48, 30))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "OMP_WAIT_POLICY"}
    # As the README runs it: with the venv activated.
    env.update(HF_HOME=str(root / "hf"), PATH=f"{console_script('monailabel').parent}{os.pathsep}{env['PATH']}")
    command = [str(console_script("monailabel")), "start_server", "--app", str(REPO_ROOT / "apps" / "medprompt"),
               "--host", "127.0.0.1", "--conf", "text_encoder", "biomedclip"]
    with serving(launch_server(root, command, studies, root / "start.pt", env)) as running:
        yield running


def wait_for_log(server: RunningServer, needle: str, timeout: float = 30.0) -> tuple[str, float]:
    """The first log line containing ``needle`` and how long after launch it was first seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log.read_text(errors="replace").splitlines():
            if needle in line:
                return line, time.monotonic() - server.started
        time.sleep(0.05)
    pytest.fail(f"no log line with {needle!r} within {timeout} s:\n{server.log_tail()}")


def test_missing_weights_are_each_reported_in_one_log_line_soon_after_start(weightless: RunningServer) -> None:
    checkpoint_line, _ = wait_for_log(weightless, "model medprompt: no MedPrompt checkpoint")
    assert str(weightless.checkpoint) in checkpoint_line and "medprompt train-zero-shot" in checkpoint_line
    encoder_line, seen_after = wait_for_log(weightless, "model medprompt: text encoder 'biomedclip'")
    _, app_started = wait_for_log(weightless, "Initializing App")
    assert seen_after - app_started < WITHIN_S, f"reported {seen_after - app_started:.1f} s after the app started"
    log = weightless.log.read_text(errors="replace")
    assert log.count("no MedPrompt checkpoint") == 1 and "Traceback" not in log


def test_a_server_whose_threads_spin_while_waiting_says_so_and_medprompt_serve_does_not_need_to(
        weightless: RunningServer, server: RunningServer) -> None:
    """`monailabel start_server` without OMP_WAIT_POLICY: drafts during a round would slow several-fold."""
    line, _ = wait_for_log(weightless, "OMP_WAIT_POLICY is not PASSIVE")
    assert "medprompt serve" in line and "export OMP_WAIT_POLICY=PASSIVE" in line
    wait_for_log(server, "Initializing App")
    assert "OMP_WAIT_POLICY" not in server.log.read_text(errors="replace")


def test_without_weights_medprompt_answers_503_saying_why_and_the_prior_keeps_serving(
    weightless: RunningServer, tmp_path: Path
) -> None:
    client = MONAILabelClient(weightless.url, tmpdir=str(tmp_path))
    listed = info(weightless.url)
    assert {"medprompt", "medprompt_prior"} <= set(listed["models"]) and TRAINER in listed["trainers"]

    def medprompt_refusal() -> str:
        with pytest.raises(MONAILabelClientException) as caught:
            client.infer("medprompt", "phantom_000", {"prompts": ["liver"]})
        status, body = error_status(caught.value)
        assert status == 503
        return json.loads(body)["detail"]

    detail = medprompt_refusal()
    assert str(weightless.checkpoint) in detail and "medprompt train-zero-shot" in detail
    _, params = client.infer("medprompt_prior", "phantom_000", {"prompts": ["liver"]})
    assert params["label_names"] == {"liver": 1}

    # A checkpoint appears (no restart): now the missing BiomedCLIP text encoder is what stops it.
    shutil.copy(write_tiny_checkpoint(tmp_path / "tiny.pt"), weightless.checkpoint)
    detail = medprompt_refusal()
    assert "biomedclip" in detail.lower() and str(weightless.checkpoint) not in detail
    _, params = client.infer("medprompt_prior", "phantom_000", {"prompts": ["spleen"]})
    assert params["label_names"] == {"spleen": 1}


# -- configuration, without a server -------------------------------------------------------------

def test_a_training_round_wins_over_the_start_checkpoint_and_none_is_a_weights_error(tmp_path: Path) -> None:
    checkpoints = Checkpoints(rounds=tmp_path / "model" / "medprompt", start=tmp_path / "start.pt")
    with pytest.raises(WeightsError, match="start.pt.*medprompt train-zero-shot"):
        checkpoints.served()
    checkpoints.start.write_bytes(b"x")
    assert checkpoints.served() == checkpoints.start
    checkpoints.rounds.mkdir(parents=True)
    checkpoints.trained.write_bytes(b"x")
    assert checkpoints.served() == checkpoints.trained


def test_conf_chooses_models_model_dir_checkpoint_and_text_encoder(tmp_path: Path) -> None:
    conf = {"models": "medprompt", "model_dir": str(tmp_path / "m"), "checkpoint": str(tmp_path / "c.pt"),
            "text_encoder": "biomedclip"}
    configs = task_configs(conf, str(tmp_path / "ignored"))
    assert list(configs) == ["medprompt"]
    config = configs["medprompt"]
    assert config.checkpoints == Checkpoints(rounds=tmp_path / "m" / "medprompt", start=tmp_path / "c.pt")
    assert config.text_encoder == "biomedclip"
    assert config.trainer()[TRAINER].config()["text_encoder"] == "biomedclip"


def test_a_rounds_default_steps_are_the_clis_for_the_kind_of_model_in_service(tmp_path: Path) -> None:
    """A round from the client runs what `medprompt train-finetune` / `train-zero-shot` run by default (the
    server's rounds took 200 steps where the CLI took 300 and 600); a ViT in service gets the ViT's."""
    from medprompt.cli import _parser
    from medprompt.model.checkpoint import DEFAULT_CHECKPOINT
    from medprompt.trainers.defaults import FINETUNE, ZERO_SHOT

    vit = write_tiny_checkpoint(tmp_path / "vit.pt")
    for start, kind in ((tmp_path / "none.pt", "sam"), (DEFAULT_CHECKPOINT, "sam"), (vit, "vit")):
        conf = {"models": "medprompt", "model_dir": str(tmp_path / "m"), "checkpoint": str(start)}
        trainers = task_configs(conf, str(tmp_path / "ignored"))["medprompt"].trainer()
        assert trainers[TRAINER].config()["steps"] == ZERO_SHOT[kind].steps, start
        assert trainers["medprompt_finetune"].config()["steps"] == FINETUNE[kind].steps, start
    assert ZERO_SHOT["sam"].steps != ZERO_SHOT["vit"].steps and FINETUNE["sam"].steps != FINETUNE["vit"].steps
    commands = _parser()._subparsers._group_actions[0].choices
    steps_help = {name: next(a.help for a in commands[name]._actions if a.dest == "steps")
                  for name in ("train-zero-shot", "train-finetune")}
    assert f"{FINETUNE['sam'].steps} (sam)" in steps_help["train-finetune"]
    assert f"{ZERO_SHOT['vit'].steps} (vit)" in steps_help["train-zero-shot"]


@pytest.mark.parametrize("value", [0, -3, "ten", 2.5, None, True])
def test_a_bad_steps_parameter_is_refused_by_name(value: object) -> None:
    with pytest.raises(InputError, match="'steps'"):
        request_int({"steps": value}, "steps", 300)
    assert request_int({"steps": "12"}, "steps", 300) == 12 and request_int({}, "steps", 300) == 300
