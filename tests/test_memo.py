"""Work kept per study between drafts (medprompt.memo): keyed by content, never a stale answer."""

from __future__ import annotations

import numpy as np

from medprompt.catalog import default_catalog
from medprompt.io.volume import Volume
from medprompt.memo import Memo, clear_all
from medprompt.phantoms import make_phantom
from medprompt.prior import engine
from medprompt.prior.engine import AnatomyPrior


def test_the_digest_follows_the_voxels_the_affine_and_the_modality() -> None:
    volume, _, _ = make_phantom(0, shape=(32, 32, 16))
    same = Volume(data=np.array(volume.data), affine=volume.affine.copy(), source="elsewhere")
    assert same.digest == Volume(data=volume.data, affine=volume.affine, source="x").digest
    assert Volume(np.asfortranarray(volume.data), volume.affine, "x").digest != same.digest  # a miss, not an error
    changed = np.array(volume.data)
    changed[3, 4, 5] += 1
    moved = volume.affine.copy()
    moved[0, 3] += 0.5
    digests = {Volume(changed, volume.affine, "x").digest, Volume(volume.data, moved, "x").digest,
               Volume(volume.data, volume.affine, "x", modality="MR").digest, same.digest}
    assert len(digests) == 4


def test_a_second_draft_of_a_study_reuses_the_prior_work_and_draws_the_same() -> None:
    clear_all()
    volume, _, _ = make_phantom(1, shape=(64, 64, 40))
    prior = AnatomyPrior()
    entries = [default_catalog()[n] for n in ("liver", "spleen", "aorta")]
    misses = engine._STUDIES.misses
    first = prior.segment_work(volume, entries)
    reloaded = Volume(np.array(volume.data), volume.affine.copy(), "reloaded", modality=volume.modality)
    again = prior.segment_work(reloaded, entries[::-1])
    assert engine._STUDIES.misses == misses + 1  # the reloaded copy was recognised by its content
    clear_all()
    fresh = prior.segment_work(volume, entries[::-1])
    for name in ("liver", "spleen", "aorta"):
        assert first.masks[name].any()
        np.testing.assert_array_equal(again.masks[name], fresh.masks[name])


def test_the_memo_keeps_the_most_recently_used_entries() -> None:
    memo: Memo[int] = Memo(entries=2)
    made: list[str] = []
    for key in ("a", "b", "a", "c", "b"):
        memo.get_or_make(key, lambda k=key: made.append(k) or len(made))
    assert made == ["a", "b", "c", "b"]  # "b" was the least recently used when "c" came
