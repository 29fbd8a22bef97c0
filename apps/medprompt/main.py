"""MONAI Label app for MedPrompt Label: wires task configs and active-learning strategies, nothing else.

Start it with ``medprompt serve`` or ``monailabel start_server --app apps/medprompt --studies DIR``.
App options (``--conf KEY VALUE``):
  models        comma-separated models to load, or ``all`` (default); available: see medprompt.configs.CONFIGS
  prompts       prompts used when a request names none, comma-separated (default: the Synapse 8)
  model_dir     where training rounds are written (default: model/ in this folder)
  checkpoint    the medprompt model file served until a training round writes one (default: the shipped one)
  text_encoder  text encoder of the medprompt model and its training (default: minilm, offline)
  tracking      ``true`` to let trainers log to MLflow (default ``false``: nothing is written or sent)
  auto_scoring  ``true`` to let MONAI Label re-run the active-learning scoring methods in the background
                at start-up, after each training round and after each next-sample request (default
                ``false``: the strategies score what is missing on demand)
  finetune_after_labels  start a medprompt_finetune round after this many new saved final labels
                since the last one (default ``off``)
  finetune_interval_min  start a medprompt_finetune round when this many minutes have passed since
                the last one and new final labels exist (default ``off``); both may be on
  finetune_steps  training steps of a scheduled round (default: the trainer's own)
Nothing is downloaded: no sample models, no dcmqi tools, and MONAI Label's SAM2 (monailabel.sam2) is
never imported.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

# This folder is also called "medprompt". The launcher adds the repository root to PYTHONPATH, but a
# monailabel started from elsewhere may not; putting the root first makes `import medprompt` always
# this checkout's package (tests/test_server.py checks it).
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from fastapi import HTTPException  # noqa: E402
import schedule  # noqa: E402  (MONAI Label's own timer runs this library's pending jobs every 30 s)
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.scoring import ScoringMethod  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.utils.async_tasks.task import AsyncTask  # noqa: E402
from monailabel.utils.async_tasks.utils import tasks  # noqa: E402
from monailabel.utils.others.generic import strtobool  # noqa: E402

import medprompt  # noqa: E402
from medprompt.access import auth_enabled, enable_token_check, exposure_warning, host_from_argv  # noqa: E402
from medprompt.activelearning import ScoreMethod, ScoreStrategy, image_scores  # noqa: E402
from medprompt.configs import task_configs  # noqa: E402
from medprompt.configs.medprompt import FINETUNE_TRAINER, MedPromptConfig  # noqa: E402
from medprompt.cpu_sharing import WAIT_POLICY, shares_cpu  # noqa: E402
from medprompt.errors import PacsError, shown  # noqa: E402
from medprompt.sam.prefetch import Prefetcher  # noqa: E402
from medprompt.schedule import FinetuneSchedule, schedule_options  # noqa: E402
from medprompt.infers import uploads  # noqa: E402
from medprompt.infers.http import ServedNames, http_errors, install_handlers  # noqa: E402
from medprompt.io.datastore import GuardedDatastore, recover  # noqa: E402
from medprompt.io.image2d import is_image2d  # noqa: E402

logger = logging.getLogger(__name__)
SPINNING_WARNING = (f"{WAIT_POLICY} is not PASSIVE in this server: on a small CPU, drafts asked for while a "
                    f"training round runs may take several times as long (medprompt/cpu_sharing.py); start it "
                    f"with `medprompt serve`, or export {WAIT_POLICY}=PASSIVE before `monailabel start_server`")


class MedPromptApp(MONAILabelApp):
    """Text-prompted 3D drafts with no pixel labels."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        # Trainers read this global; MONAI Label's default (on) would start MLflow runs for every training.
        settings.MONAI_LABEL_TRACKING_ENABLED = bool(strtobool(conf.get("tracking", "false")))
        # MONAI Label's default (on) starts two app processes per next-sample request even when every
        # score is cached, and Ctrl-C waits for all queued ones; the strategies score on demand instead.
        settings.MONAI_LABEL_AUTO_UPDATE_SCORING = bool(strtobool(conf.get("auto_scoring", "false")))
        self.task_configs = task_configs(conf, model_dir=os.path.join(app_dir, "model"))
        self.schedule_options = schedule_options(conf)  # a bad value stops the start with one line
        # Next Sample starts on the study's LiteMedSAM embeddings in the background, when drafts use it.
        drawing = [c for c in self.task_configs.values() if getattr(c, "refine", None) == "sam"]
        prefetch = drawing and strtobool(conf.get("sam_prefetch", "true"))
        # ... and the served model is adapted to it (MedPromptConfig.prefetch), unless --conf adapt false
        adapting = [c for c in drawing if isinstance(c, MedPromptConfig) and c.adapt]
        run = (lambda path, _weights, stop: adapting[0].prefetch(path, stop)) if adapting else None
        self.prefetcher = Prefetcher(drawing[0].sam_checkpoint, run=run, logger=logger) if prefetch else None
        self.finetune_schedule: FinetuneSchedule | None = None  # made at server start, not in training's child
        served = sys.modules.get("monailabel.app")  # the FastAPI app, when this runs inside the server
        if served is not None and hasattr(served, "app"):
            install_handlers(served.app, served=lambda: ServedNames(
                trainers=set(self._trainers), scoring=set(self._scoring_methods), models=set(self._infers),
                dicomweb=self.studies.startswith(("http://", "https://"))))
            uploads.install()  # a refused upload's copy is removed, not left in the temp folder
            enable_token_check()
            warning = exposure_warning(host_from_argv(sys.argv) or "127.0.0.1", auth_enabled())
            if warning:  # `monailabel start_server` listens on 0.0.0.0 unless given --host
                logger.warning(warning)
            if not shares_cpu():  # `monailabel start_server` without the variable `medprompt serve` sets
                logger.warning(SPINNING_WARNING)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedPrompt Label",
            description="Type what to segment ('liver', or a sentence); get a 3D draft made without pixel labels",
            version=medprompt.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, config in self.task_configs.items():
            task = config.infer()  # the click config serves a 2D and a 3D model
            infers.update(task if isinstance(task, dict) else {name: task})
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        for name, config in self.task_configs.items():
            task = config.trainer()
            trainers.update(task if isinstance(task, dict) else {name: task} if task is not None else {})
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        scored = {name: ScoreStrategy(score) for name, score in image_scores(self.task_configs).items()}
        return {"random": Random(), "first": First(), **scored}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {name: ScoreMethod(score) for name, score in image_scores(self.task_configs).items()}

    def init_datastore(self) -> Any:
        """MONAI Label's local datastore, refusing label tags that would leave its folder and unknown images,
        writing labels and its index atomically, and recovering from a save that a crash cut short.
        A DICOMweb URL gets ours (medprompt.pacs): series fetched as stored and decoded here, final
        labels stored back as DICOM SEG, no dcmqi."""
        if self.studies.startswith(("http://", "https://")):
            from medprompt.pacs.datastore import DicomWebDatastore
            from medprompt.pacs.seg_output import install

            self.studies = self.studies.rstrip("/").strip()
            try:
                store = DicomWebDatastore(self.studies)
            except PacsError as error:
                if "monailabel.app" not in sys.modules:
                    raise
                # Inside the server (`monailabel start_server`), uvicorn would print a traceback: one line instead.
                logger.error(f"error: {error}")
                logging.shutdown()
                os._exit(2)
            install(self.datastore)
            return store
        recover(self.studies)
        # 2D studies too: pictures (PNG, JPEG, TIFF, BMP) and 2D DICOM files beside the NIfTI/NRRD volumes.
        return GuardedDatastore.open(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                     auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                     read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """As MONAI Label's; the chosen study's LiteMedSAM embeddings are then computed in the background."""
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(status_code=404, detail=f"unknown strategy '{strategy}'; available: "
                                                        f"{', '.join(sorted(self._strategies))}")
        result = super().next_sample(request)
        if self.prefetcher is not None and result.get("path") and not is_image2d(result["path"]):
            self.prefetcher.start(result["path"])  # a 2D study's one embedding is computed with its draft
        return result

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """As MONAI Label's, but bad requests become HTTP 4xx naming the problem instead of a bare 500."""
        with http_errors():
            model = request.get("model")
            if model not in self._infers:
                raise HTTPException(status_code=404, detail=f"unknown model '{model}'; available: "
                                                            f"{', '.join(sorted(self._infers))}")
            image = request.get("image")
            if not isinstance(image, str) or not (_readable_path(image, self.studies)
                                                  or (datastore or self.datastore()).get_image_uri(image)):
                # Any path on the server is not an image: only MONAI Label's upload file and what lies in the studies folder.
                raise HTTPException(status_code=404, detail=f"unknown image id {shown(image)}: not in the datastore")
            result = super().infer(request, datastore)
            if self.studies.startswith(("http://", "https://")):
                from medprompt.pacs.seg_output import remember

                remember(result)  # its class names, should the client ask for the draft as DICOM SEG
            return result

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        """As MONAI Label's, but a bad parameter becomes HTTP 4xx with ``run_sync``; in MONAI Label's usual
        child process the round ends with status ERROR and the message as the last line of its details."""
        with http_errors():
            return super().train(request)

    def on_init_complete(self) -> None:
        """Server start (not training's child process): load the models' weights in the background.

        Each model that cannot serve logs one line naming what is missing and how to provide it,
        within seconds, while the server already answers and the other models keep serving. The
        loaders are not daemon threads: a Ctrl-C during loading waits for them (seconds) instead of
        tearing the interpreter down under torch's loading code, which aborted the process (exit 134).
        """
        super().on_init_complete()
        for name, task in self._infers.items():
            if hasattr(task, "problems"):
                threading.Thread(target=_report_problems, args=(name, task), name=f"load-{name}").start()
        self._start_finetune_schedule()

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any] | None:
        """A client saved a label: a new final one counts towards the next scheduled finetune round."""
        result = super().on_save_label(image_id, label_id)
        if self.finetune_schedule is not None:
            try:
                self.finetune_schedule.label_saved(image_id, self._final_label(label_id))
            except OSError as e:  # the label is saved; a schedule that cannot write its state must not fail that
                logger.error(f"scheduled finetuning: could not record the label for {image_id}: {e}")
        return result

    def _final_label(self, label_id: str) -> Path | None:
        if is_image2d(self.datastore().get_image_uri(label_id) or ""):
            return None  # a 2D study's correction does not train the 3D network: it starts no round
        uri = self.datastore().get_label_uri(label_id, "final")
        return Path(uri) if uri and os.path.isfile(uri) else None

    def _start_finetune_schedule(self) -> None:
        """``--conf finetune_after_labels`` / ``finetune_interval_min``: rounds start by themselves."""
        if not self.schedule_options.enabled:
            return
        if FINETUNE_TRAINER not in self._trainers or not isinstance(self.datastore(), LocalDatastore):
            logger.error(f"scheduled finetuning is off: it needs the {FINETUNE_TRAINER} trainer (models medprompt) "
                         "and a local studies folder")
            return
        rounds = self.task_configs["medprompt"].checkpoints.rounds
        self.finetune_schedule = FinetuneSchedule(rounds / "finetune_schedule.json", self.schedule_options,
                                                  self._start_scheduled_round)
        self.finetune_schedule.scan((i, p) for i in self.datastore().get_labeled_images()
                                    if (p := self._final_label(i)) is not None)
        schedule.every(30).seconds.do(self.finetune_schedule.tick)
        logger.info(f"scheduled finetuning on: {self.schedule_options}")

    def _start_scheduled_round(self) -> bool:
        """Hand a round to MONAI Label's runner, as POST /train/ does; False while any training runs or waits
        (the runner refuses only a running one and would queue a second behind it)."""
        if any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("train")):
            return False
        request: dict[str, Any] = {"model": FINETUNE_TRAINER}
        if self.schedule_options.steps is not None:
            request["steps"] = self.schedule_options.steps
        started, _ = AsyncTask.run("train", request=request)
        return started is not None

    def _download_dcmqi_tools(self) -> None:
        """MONAI Label fetches dcmqi from GitHub for its DICOMweb datastore; ours writes DICOM SEG in-process."""


def _readable_path(path: str, studies: str) -> bool:
    """A path a request may name instead of an image id: the temporary file POST /infer/<model> writes a
    client's upload to (tempfile's folder), or a file or DICOM series folder inside the studies folder."""
    if "\0" in path or not os.path.exists(path):
        return False
    real = os.path.realpath(path)
    if os.path.isfile(real) and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()):
        return True
    if studies.startswith(("http://", "https://")):
        return False
    root = os.path.realpath(studies)
    return os.path.commonpath([real, root]) == root


def _report_problems(name: str, task: Any) -> None:
    problems = task.problems()
    for problem in problems:
        logger.error(f"model {name}: {problem}")
    if not problems:
        logger.info(f"model {name}: weights loaded")
