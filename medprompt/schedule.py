"""When the server starts a ``medprompt_finetune`` round by itself: after K new final labels and/or every M minutes.

The counts live in a JSON file in the app's model folder, so a restart neither loses the labels
saved since the last round nor restarts the interval. A "new final label" is a final label file
whose modification time the schedule has not seen for that image: MONAI Label's save-label hook
does not say which tag was saved, and labels saved while the server was down are found at start.
Starting a round goes through MONAI Label's own runner, which runs one training at a time; while
one runs (or waits), the schedule skips quietly and tries again on the next label or tick.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medprompt.errors import InputError
from medprompt.io.volume import write_json

logger = logging.getLogger(__name__)

AFTER_LABELS = "finetune_after_labels"
INTERVAL_MIN = "finetune_interval_min"
STEPS = "finetune_steps"


@dataclass
class ScheduleState:
    """What a restart must not lose."""

    seen: dict[str, float] = field(default_factory=dict)  # image id -> mtime of its counted final label
    new_labels: int = 0  # final labels saved since the last scheduled round started
    last_round: float | None = None  # epoch seconds when the last scheduled round started
    since: float | None = None  # epoch seconds when the interval started counting (first start)
    rounds: int = 0  # scheduled rounds started so far


@dataclass(frozen=True)
class ScheduleOptions:
    after_labels: int | None = None
    interval_min: float | None = None
    steps: int | None = None  # training steps of a scheduled round; None: the trainer's default

    @property
    def enabled(self) -> bool:
        return self.after_labels is not None or self.interval_min is not None


def schedule_options(conf: Mapping[str, str]) -> ScheduleOptions:
    """The two ``--conf`` options; InputError naming the option when one is not a positive number."""

    def read(key: str, kind: type) -> int | float | None:
        text = str(conf.get(key) or "").strip()
        if not text or text.lower() in ("off", "false", "0", "none"):
            return None
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise InputError(f"--conf {key} must be a positive {'whole ' if kind is int else ''}number or 'off', "
                             f"not '{text}'")
        return value

    return ScheduleOptions(after_labels=read(AFTER_LABELS, int), interval_min=read(INTERVAL_MIN, float),
                           steps=read(STEPS, int))


class FinetuneSchedule:
    """Decides when a round is due and starts it through ``start_round`` (True when the runner took it)."""

    def __init__(self, state_path: Path, options: ScheduleOptions, start_round: Callable[[], bool],
                 clock: Callable[[], float] = time.time) -> None:
        self.state_path = Path(state_path)
        self.options = options
        self.start_round = start_round
        self.clock = clock
        self._lock = threading.Lock()  # labels arrive on request threads, ticks on MONAI Label's timer thread
        fresh = not self.state_path.is_file()
        self.state = ScheduleState() if fresh else self._load()
        self._fresh = fresh
        if self.state.since is None:
            self.state.since = self.clock()
            self._save()

    def _load(self) -> ScheduleState:
        try:
            return ScheduleState(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            logger.warning(f"{self.state_path}: unreadable schedule state ({e}); counting from now")
            return ScheduleState()

    def _save(self) -> None:
        """Atomically: a crash mid-write leaves the previous state, never half a file."""
        write_json(self.state_path, asdict(self.state))

    def scan(self, labels: Iterable[tuple[str, Path]]) -> bool:
        """At start: count final labels saved while the server was down (on a first start, none are new)."""
        with self._lock:
            for image_id, path in labels:
                self._count(image_id, path, count=not self._fresh)
            self._save()
        return self.tick()

    def label_saved(self, image_id: str, final_label: Path | None) -> bool:
        """MONAI Label saved a label for ``image_id``; counts it when its final label file is new."""
        with self._lock:
            if final_label is None or not self._count(image_id, final_label, count=True):
                return False
            self._save()
        return self.tick()

    def _count(self, image_id: str, path: Path, count: bool) -> bool:
        try:
            mtime = Path(path).stat().st_mtime
        except OSError:
            return False
        if self.state.seen.get(image_id) == mtime:
            return False
        self.state.seen[image_id] = mtime
        self.state.new_labels += int(count)
        return count

    def due(self) -> str | None:
        """Why a round should start now, or None."""
        opts, st = self.options, self.state
        if opts.after_labels is not None and st.new_labels >= opts.after_labels:
            return f"{st.new_labels} new final label(s) since the last round (finetune_after_labels {opts.after_labels})"
        if opts.interval_min is not None and st.new_labels > 0:
            start = st.last_round if st.last_round is not None else st.since
            if self.clock() - start >= opts.interval_min * 60:
                return f"{opts.interval_min:g} min since the last round and {st.new_labels} new final label(s)"
        return None

    def tick(self) -> bool:
        """Start a round if one is due and the runner takes it; True when one started."""
        with self._lock:
            reason = self.due()
            if reason is None:
                return False
            if not self.start_round():
                logger.debug(f"scheduled finetune round due ({reason}) but a training runs; trying again later")
                return False
            self.state.new_labels = 0
            self.state.last_round = self.clock()
            self.state.rounds += 1
            self._save()
        logger.info(f"started finetune round {self.state.rounds}: {reason}")
        return True
