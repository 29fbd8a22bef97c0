"""The annotation loop: the finetune schedule on its own, then infer -> correct -> round -> infer over REST.

The schedule is checked with a fake runner and clock (counting, skipping while a training runs,
persistence across a restart, the interval, bad options). The loop runs a real server on two small
phantoms with a tiny random checkpoint and ``--conf finetune_after_labels 1``: saving one corrected
label must start a round by itself, and the next draft must score higher against the phantom's truth.
It is driven twice: by MONAI Label's Python client and by 3D Slicer's MONAI Label module client
(the copy the monailabel wheel installs), the way the Slicer module calls it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import console_script, launch_server, serving, write_tiny_checkpoint
from monailabel.client import MONAILabelClient

from medprompt.errors import InputError
from medprompt.io.volume import load_labelmap
from medprompt.schedule import FinetuneSchedule, ScheduleOptions, schedule_options

FINETUNE = "medprompt_finetune"
PROMPTS = ("liver", "spleen")
ROUND_STEPS = 150  # enough for the tiny network to learn the corrected organs; ~10 s on an idle 2-core CPU


class Runner:
    """Stands in for MONAI Label's runner: takes a round unless ``busy``; records what it took."""

    def __init__(self) -> None:
        self.busy = False
        self.started = 0

    def __call__(self) -> bool:
        if self.busy:
            return False
        self.started += 1
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def touch_label(folder: Path, image: str, mtime: float) -> Path:
    path = folder / f"{image}.nii.gz"
    path.write_bytes(b"label")
    os.utime(path, (mtime, mtime))
    return path


# -- the schedule -----------------------------------------------------------------------------------

def test_a_round_starts_after_k_new_final_labels_and_the_count_restarts(tmp_path: Path) -> None:
    runner = Runner()
    sched = FinetuneSchedule(tmp_path / "state.json", ScheduleOptions(after_labels=2), runner)
    assert not sched.label_saved("a", touch_label(tmp_path, "a", 100)) and runner.started == 0
    # Saving the same file again (same mtime: e.g. a non-final tag saved for the image) is not new.
    assert not sched.label_saved("a", tmp_path / "a.nii.gz") and sched.state.new_labels == 1
    assert not sched.label_saved("b", None)  # no final label for this image: nothing counted
    assert sched.label_saved("a", touch_label(tmp_path, "a", 200))  # a corrected again counts
    assert runner.started == 1 and sched.state.new_labels == 0 and sched.state.rounds == 1


def test_while_a_training_runs_the_schedule_skips_and_starts_the_round_later(tmp_path: Path) -> None:
    runner = Runner()
    runner.busy = True
    sched = FinetuneSchedule(tmp_path / "state.json", ScheduleOptions(after_labels=1), runner)
    assert not sched.label_saved("a", touch_label(tmp_path, "a", 100))
    assert runner.started == 0 and sched.state.new_labels == 1  # the label still counts
    assert not sched.tick()
    runner.busy = False
    assert sched.tick() and runner.started == 1
    assert not sched.tick() and runner.started == 1  # nothing new since: no second round


def test_a_restart_keeps_the_count_and_counts_labels_saved_while_down(tmp_path: Path) -> None:
    state, runner = tmp_path / "state.json", Runner()
    labels = [("a", touch_label(tmp_path, "a", 100)), ("b", touch_label(tmp_path, "b", 100))]
    first = FinetuneSchedule(state, ScheduleOptions(after_labels=3), runner)
    assert not first.scan(labels) and first.state.new_labels == 0  # a first start: existing labels are old
    first.label_saved("a", touch_label(tmp_path, "a", 200))
    assert json.loads(state.read_text())["new_labels"] == 1

    touch_label(tmp_path, "b", 300)  # corrected while the server was down
    again = FinetuneSchedule(state, ScheduleOptions(after_labels=3), runner)
    assert not again.scan(labels) and again.state.new_labels == 2
    assert again.label_saved("c", touch_label(tmp_path, "c", 100)) and runner.started == 1


def test_the_interval_starts_a_round_only_when_due_and_something_is_new(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    sched = FinetuneSchedule(tmp_path / "state.json", ScheduleOptions(interval_min=10), runner, clock)
    clock.now += 11 * 60
    assert not sched.tick()  # due, but no new label: nothing to learn from
    sched.label_saved("a", touch_label(tmp_path, "a", 100))
    assert runner.started == 1 and sched.state.last_round == clock.now
    clock.now += 5 * 60
    sched.label_saved("b", touch_label(tmp_path, "b", 100))
    assert runner.started == 1  # 5 min since the last round
    clock.now += 5 * 60
    assert sched.tick() and runner.started == 2
    # The interval counts from the last round, also after a restart.
    clock.now += 60
    restarted = FinetuneSchedule(tmp_path / "state.json", ScheduleOptions(interval_min=10), runner, clock)
    restarted.label_saved("c", touch_label(tmp_path, "c", 100))
    assert runner.started == 2 and restarted.state.rounds == 2


def test_schedule_options_are_off_by_default_and_bad_values_name_the_option() -> None:
    assert not schedule_options({}).enabled
    assert not schedule_options({"finetune_after_labels": "off"}).enabled
    opts = schedule_options({"finetune_after_labels": "3", "finetune_interval_min": "2.5", "finetune_steps": "40"})
    assert (opts.after_labels, opts.interval_min, opts.steps) == (3, 2.5, 40)
    for key, value in (("finetune_after_labels", "1.5"), ("finetune_interval_min", "-1"), ("finetune_steps", "x")):
        with pytest.raises(InputError, match=f"--conf {key} .*'{value}'"):
            schedule_options({key: value})


# -- the loop over REST -----------------------------------------------------------------------------

def slicer_client_class() -> type:
    """The client class of 3D Slicer's MONAI Label module, from the copy the monailabel wheel installs.

    The wheel puts the Slicer plugin under ``<prefix>/monailabel/plugins/slicer``; its
    ``MONAILabelLib/client.py`` is plain Python (requests, http.client), so it runs without Slicer.
    """
    path = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel" / "MONAILabelLib" / "client.py"
    assert path.is_file(), f"3D Slicer's MONAI Label client not found at {path} (installed with monailabel)"
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MONAILabelClient


class Annotator:
    """How one client drives the loop: MONAI Label's Python client, or 3D Slicer's module.

    Slicer's module asks for drafts as uint8 NRRD (``MONAILabelLogic.infer``) and saves a correction
    with no tag (the server's "final") and ``label_info`` naming each segment (``onSaveLabel``).
    """

    def __init__(self, kind: str, url: str, tmpdir: Path) -> None:
        self.kind = kind
        cls = MONAILabelClient if kind == "monailabel" else slicer_client_class()
        self.client = cls(url, tmpdir=str(tmpdir))
        self.tmpdir = tmpdir

    def draft(self, image: str) -> tuple[np.ndarray, dict[str, int]]:
        params = {"prompts": ",".join(PROMPTS)}
        if self.kind == "slicer":
            params.update(result_extension=".nrrd", result_dtype="uint8")
        path, response = self.client.infer("medprompt", image, params)
        assert path.endswith(".nrrd" if self.kind == "slicer" else ".nii.gz"), path
        labels, _, _ = load_labelmap(path)
        self.checkpoint = Path(response["checkpoint"]["path"])
        return labels, response["label_names"]

    def save_correction(self, image: str, corrected: np.ndarray, affine: np.ndarray) -> None:
        label = self.tmpdir / "corrected.nii.gz"
        nib.save(nib.Nifti1Image(corrected, affine), label)
        label_info = [{"name": name, "idx": value} for value, name in enumerate(PROMPTS, start=1)]
        if self.kind == "slicer":
            self.client.save_label(image, str(label), params={"label_info": label_info})
        else:
            self.client.save_label(image, str(label), tag="final", params={"label_info": label_info})


def mean_dice(pred: np.ndarray, names: dict[str, int], truth: np.ndarray, truth_names: dict[str, int]) -> float:
    scores = []
    for name in PROMPTS:
        p, t = pred == names[name], truth == truth_names[name]
        scores.append(2 * np.sum(p & t) / (p.sum() + t.sum()))
    return float(np.mean(scores))


@pytest.mark.parametrize("kind", ["monailabel", "slicer"])
def test_a_saved_correction_starts_a_round_and_the_next_draft_scores_higher(tmp_path: Path, kind: str) -> None:
    from medprompt.phantoms import write_sample_data

    studies = tmp_path / "studies"
    write_sample_data(studies, n=2, seed=5, shape=(48, 48, 32))  # phantom_001 stays unlabelled
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    truth_img = nib.load(studies / "reference" / "phantom_000.nii.gz")
    truth = np.asarray(truth_img.dataobj)
    truth_names = json.loads((studies / "reference" / "phantom_000.json").read_text())["labels"]
    command = [str(console_script("medprompt")), "serve", "--conf", "finetune_after_labels", "1",
               "--conf", "finetune_steps", str(ROUND_STEPS)]
    with serving(launch_server(tmp_path, command, studies, checkpoint)) as server:
        annotator = Annotator(kind, server.url, tmp_path)
        client = annotator.client
        draft, names = annotator.draft("phantom_000")
        assert draft.shape == truth.shape
        before = mean_dice(draft, names, truth, truth_names)
        assert not client.train_status(check_if_running=True)  # nothing runs before a correction

        # The annotator's correction of the draft: the true organs, named as 3D Slicer names them.
        corrected = np.zeros(truth.shape, np.uint8)
        for value, name in enumerate(PROMPTS, start=1):
            corrected[truth == truth_names[name]] = value
        annotator.save_correction("phantom_000", corrected, truth_img.affine)

        deadline = time.monotonic() + 600  # generous: a loaded CI machine ran it at 1.8 s per step
        task = client.train_status()  # the round was handed to MONAI Label's runner by the save itself
        assert task and task["request"]["model"] == FINETUNE, f"no round started:\n{server.log_tail()}"
        while (task := client.train_status())["status"] in ("SUBMITTED", "RUNNING"):
            assert time.monotonic() < deadline, f"round still running: {task.get('details')}"
            time.sleep(0.5)
        assert task["status"] == "DONE", "\n".join(task.get("details", []))

        stats = client.info()["train_stats"][FINETUNE]
        state = json.loads((server.model_dir / "medprompt" / "finetune_schedule.json").read_text())
        assert state["rounds"] == 1 and state["new_labels"] == 0
        # Replaced only because the candidate was no worse on the held-out (here: the only) correction.
        assert stats["accepted"] and stats["steps"] == ROUND_STEPS
        assert stats["validation_dice_after"] >= stats["validation_dice_before"]
        trained = server.model_dir / "medprompt" / "medprompt.pt"
        assert Path(stats["checkpoint"]) == trained and Path(stats["version"]).is_file()

        draft, names = annotator.draft("phantom_000")
        assert annotator.checkpoint == trained
        after = mean_dice(draft, names, truth, truth_names)
        assert after > before + 0.05, f"mean Dice {before:.3f} -> {after:.3f}"


def test_bad_schedule_option_stops_serve_before_start_up(tmp_path):
    from medprompt.server import serve

    with pytest.raises(InputError, match="finetune_after_labels"):
        serve(tmp_path, port=1, conf={"finetune_after_labels": "x"})
