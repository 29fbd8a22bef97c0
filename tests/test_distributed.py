"""Training across processes: two CPU processes (gloo) stay identical, average real gradients, and only
rank 0 writes; the CLI works under torchrun; MONAI Label's multi-GPU request picks the GPUs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import find_free_port
from medprompt.catalog import default_catalog
from medprompt.errors import InputError
from medprompt.model.checkpoint import load_model
from medprompt.model.network import MedPromptNet, NetConfig
from medprompt.phantoms import write_sample_data
from medprompt.teachers import PriorTeacher
from medprompt.trainers.zero_shot import TrainingVolume, ZeroShotConfig, list_studies, prepare_volumes

CLASSES = ("liver", "spleen", "kidney_left")
WORLD = 2
B = 2  # per-process batch of the gradient-averaging check


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    write_sample_data(root, n=2, seed=5, shape=(48, 48, 32))
    return root


@pytest.fixture(scope="module")
def volumes(studies: Path, tmp_path_factory) -> list[TrainingVolume]:
    catalog = default_catalog()
    return prepare_volumes(list_studies([studies]), PriorTeacher(catalog), CLASSES, catalog,
                           tmp_path_factory.mktemp("cache"), progress=False)


def _vectors() -> np.ndarray:
    """Random unit text vectors: run_training only needs their shape, and MiniLM's load is slow."""
    v = np.random.default_rng(1).normal(size=(len(CLASSES), 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same 2B tiles, targets and text in every process."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * B, 3, 64, 64, generator=g)
    tgt = (torch.rand(WORLD * B, len(CLASSES), 64, 64, generator=g) > 0.7).float()
    return x, tgt, torch.from_numpy(_vectors())


def _net() -> MedPromptNet:
    torch.manual_seed(123)
    return MedPromptNet(NetConfig.preset("tiny", text_dim=384))


def _sgd_step(model: torch.nn.Module, x: torch.Tensor, tgt: torch.Tensor, text: torch.Tensor) -> None:
    """One step on a loss that is a mean over samples (so the mean of two halves' losses is the whole's).

    The region term goes through region_logits, outside forward, as in run_training.
    """
    from medprompt.distributed import unwrap

    logits, patches = model(x, text)
    region = unwrap(model).region_logits(patches, text)
    loss = F.binary_cross_entropy_with_logits(logits, tgt) + region.logsumexp(1).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _worker(rank: int, port: int, volumes: list[TrainingVolume], tmp: str) -> None:
    """One of the two processes, told its place the way torchrun tells it (environment variables)."""
    import medprompt.trainers.zero_shot as zs
    from medprompt import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    record: dict = {"writes": [], "tiles": [], "steps": [], "nets": []}
    real_save, real_atomic, real_wrap, real_sample = zs.save_model, distributed.atomic_torch_save, zs.wrap_model, \
        zs.TileSampler.sample

    def save_model(path, *a, **k):
        record["writes"].append(str(path))
        return real_save(path, *a, **k)

    def atomic_torch_save(obj, path):
        record["writes"].append(str(path))
        return real_atomic(obj, path)

    def wrap_model(net, ctx):
        record["nets"].append(net)
        return real_wrap(net, ctx)

    def sample(self, n):
        out = real_sample(self, n)
        record["tiles"].append(out[0].copy())
        return out

    zs.save_model, distributed.atomic_torch_save, zs.wrap_model, zs.TileSampler.sample = \
        save_model, atomic_torch_save, wrap_model, sample  # the resumable state is written by end_of_step
    ctx = distributed.init_distributed("cpu")
    out = Path(tmp) / "run" / "m.pt"
    cfg = ZeroShotConfig(studies=[], out=out, steps=4, batch_size=2, model_config="tiny", classes=CLASSES,
                         device="cpu", save_every=2, time_limit_s=0.0)
    # A run stopped by its time limit (all processes together), then resumed to the end.
    zs.run_training(cfg, volumes, _vectors(), "test", {}, False, lambda s, _: record["steps"].append(s))
    cfg.time_limit_s = None
    zs.run_training(cfg, volumes, _vectors(), "test", {}, False, lambda s, _: record["steps"].append(s))
    trained = {k: v.clone() for k, v in record.pop("nets")[-1].state_dict().items()}

    # One DDP step, each process on its half of the fixed batch.
    x, tgt, text = _fixed_batch()
    model = distributed.wrap_model(_net(), ctx)
    half = slice(rank * B, (rank + 1) * B)
    _sgd_step(model, x[half], tgt[half], text)
    mean_rank = distributed.all_mean(float(rank), ctx)
    record["shares"] = _shares(ctx)
    distributed.shutdown(ctx)
    torch.save({**record, "trained": trained, "ddp_step": distributed.unwrap(model).state_dict(),
                "mean_rank": mean_rank, "ctx": (ctx.rank, ctx.world, ctx.is_main)}, Path(tmp) / f"rank{rank}.pt")


STUDIES = ["s0", "s1", "s2"]  # three unlabelled studies over two processes: two and one
CORRECTED = ["c0"]  # a correction every process keeps


def _shares(ctx) -> dict:
    """What a round spread over processes does with its studies: the shard, the draws, the class areas."""
    from medprompt import distributed
    from medprompt.trainers.sam_net_train import process_draws
    from medprompt.trainers.sam_rounds import study_draws

    mine, held = distributed.shard(STUDIES, ctx)
    zero_shot = process_draws(np.ones(len(mine)), np.full(len(mine), held), ctx)
    g = study_draws(len(CORRECTED), len(STUDIES), 0.5)
    finetune = process_draws(np.concatenate([g[:1], np.full(len(mine), g[-1])]),
                             np.array([ctx.world] + [held] * len(mine)), ctx)
    area = torch.tensor([float(STUDIES.index(n) + 1) for n in mine], dtype=torch.float64).sum()[None]
    return {"mine": mine, "zero_shot": zero_shot, "finetune": finetune, "names": distributed.gathered(mine, ctx),
            "area": distributed.all_sum(area, ctx).item()}


@pytest.fixture(scope="module")
def two_ranks(volumes, tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(find_free_port(), volumes, str(tmp)), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_a_round_over_two_processes_draws_every_study_as_one_process_would(two_ranks):
    """Each process teaches and holds its share of the studies; each draws from its own, its loss scaled so
    that the mean over processes (DDP's averaged gradient) weighs every study as one process does."""
    from medprompt.trainers.sam_rounds import study_draws

    _, ranks = two_ranks
    shares = [r["shares"] for r in ranks]
    assert [s["mine"] for s in shares] == [["s0", "s2"], ["s1"]]
    assert all(s["names"] == ["s0", "s2", "s1"] for s in shares)  # the model's trained_on: every study once
    assert all(s["area"] == 6.0 for s in shares)  # the class balance counts every study once: 1 + 2 + 3

    def overall(key: str, names: list[list[str]]) -> dict[str, float]:
        """Each study's expected weight in the averaged loss: sum over processes of scale x draw / world."""
        out: dict[str, float] = {}
        for s, mine in zip(shares, names):
            p, scale = s[key]
            for name, q in zip(mine, p):
                out[name] = out.get(name, 0.0) + scale * q / WORLD
        return out

    mine = [s["mine"] for s in shares]
    assert overall("zero_shot", mine) == pytest.approx({n: 1 / 3 for n in STUDIES})
    assert [s["zero_shot"][1] for s in shares] == pytest.approx([4 / 3, 2 / 3])  # two studies, one
    g = study_draws(len(CORRECTED), len(STUDIES), 0.5)
    assert overall("finetune", [CORRECTED + m for m in mine]) == pytest.approx(
        {"c0": g[0], **{n: g[-1] for n in STUDIES}})


def test_a_process_shares_studies_and_takes_them_all_when_there_are_fewer_than_processes():
    from medprompt.distributed import DistContext, shard
    from medprompt.trainers.sam_net_train import process_draws

    one = DistContext(0, 1, 0, torch.device("cpu"))
    assert shard([1, 2, 3], one) == ([1, 2, 3], 1)
    p, scale = process_draws(np.array([2.0, 1.0, 1.0]), np.ones(3), one)
    assert scale == 1.0 and p.tolist() == [0.5, 0.25, 0.25]  # one process: the draws as given
    assert shard(list("abcde"), DistContext(1, 2, 1, torch.device("cpu"))) == (["b", "d"], 1)
    assert shard(["a"], DistContext(1, 2, 1, torch.device("cpu"))) == (["a"], 2)  # never an empty share
    assert shard([], DistContext(1, 2, 1, torch.device("cpu"))) == ([], 2)


def test_ranks_know_their_place_and_average(two_ranks):
    _, ranks = two_ranks
    assert [r["ctx"] for r in ranks] == [(0, 2, True), (1, 2, False)]
    assert [r["mean_rank"] for r in ranks] == [0.5, 0.5]


def test_two_processes_end_with_identical_weights_from_different_tiles(two_ranks):
    tmp, (r0, r1) = two_ranks
    assert r0["trained"].keys() == r1["trained"].keys()
    assert all(torch.equal(r0["trained"][k], r1["trained"][k]) for k in r0["trained"])
    assert not np.array_equal(r0["tiles"][0], r1["tiles"][0])  # seed + rank: each draws its own tiles
    saved, meta = load_model(tmp / "run" / "m.pt")
    assert meta["step"] == 4
    for k, v in saved.state_dict().items():  # the file holds the trained weights (in half precision)
        assert torch.allclose(v, r0["trained"][k], atol=1e-2, rtol=1e-2), k


def test_only_rank_0_writes_logs_and_the_time_limit_stops_all(two_ranks):
    tmp, (r0, r1) = two_ranks
    out = str(tmp / "run" / "m.pt")
    assert r1["writes"] == [] and r1["steps"] == []
    assert set(r0["writes"]) == {out, out + ".state"}
    # Stopped after step 1 (saved), resumed for steps 2-4: both processes did the same steps, or
    # rank 0 would have waited forever for rank 1's gradients.
    assert r0["steps"] == [1, 2, 3, 4]
    assert len(r0["tiles"]) == len(r1["tiles"]) == 4
    assert sorted(p.name for p in (tmp / "run").iterdir()) == ["m.pt", "m.pt.state"]


def test_ddp_step_equals_one_step_on_the_union_of_both_batches(two_ranks):
    _, (r0, r1) = two_ranks
    x, tgt, text = _fixed_batch()
    union, alone = _net(), _net()
    start = {k: v.clone() for k, v in union.state_dict().items()}
    _sgd_step(union, x, tgt, text)
    _sgd_step(alone, x[:B], tgt[:B], text)  # what rank 0 would do if gradients were not averaged
    gap = max((r0["ddp_step"][k] - union.state_dict()[k]).abs().max().item() for k in start)
    moved = max((union.state_dict()[k] - start[k]).abs().max().item() for k in start)
    unaveraged = max((alone.state_dict()[k] - union.state_dict()[k]).abs().max().item() for k in start)
    assert moved > 1e-2 and unaveraged > 1e-3
    assert gap < 1e-5 < unaveraged / 100
    assert all(torch.equal(r0["ddp_step"][k], r1["ddp_step"][k]) for k in start)


def test_cli_under_torchrun_writes_one_loadable_model(studies: Path, tmp_path: Path, monkeypatch):
    import tempfile

    from medprompt.distributed import run_torchrun

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    out = tmp_path / "m.pt"
    lines: list[str] = []
    run_torchrun(["train-zero-shot", "--arch", "vit", "--studies", str(studies), "--out", str(out), "--steps", "2",
                  "--batch-size", "1", "--model-config", "tiny", "--device", "cpu", "--seed", "3"], WORLD,
                 env={"OMP_NUM_THREADS": "1"}, on_line=lines.append)
    net, meta = load_model(out)
    assert meta["step"] == 2 and net.cfg.tile == 64
    assert sum(line.startswith("wrote ") for line in lines) == 1  # rank 0 alone reports
    assert any("2 processes" in line for line in lines)
    with pytest.raises(RuntimeError, match="exit code .*required: --studies"):  # a usage error, quick
        run_torchrun(["train-zero-shot"], WORLD, on_line=lines.append)
    assert not list(temp.iterdir()), "torchrun left its folders in the temp folder"


def test_the_default_model_trains_under_torchrun_each_process_teaching_its_own_study(
        studies: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """MedPromptNet on LiteMedSAM features (the default --arch) in two processes: each teaches one of the
    two studies (prior + LiteMedSAM, real weights), one model comes out, trained on both. The same command
    in one process is the same run (resume does not depend on the number of processes): nothing trains."""
    from medprompt.cli import main
    from medprompt.distributed import run_torchrun
    from medprompt.model.sam_checkpoint import load_net

    out = tmp_path / "m.pt"
    lines: list[str] = []
    args = ["train-zero-shot", "--studies", str(studies), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--model-config", "tiny", "--device", "cpu"]
    run_torchrun(args, WORLD, env={"OMP_NUM_THREADS": "1", "MEDPROMPT_CACHE": str(tmp_path / "cache")},
                 on_line=lines.append)
    _, meta = load_net(out)
    assert meta["step"] == 2
    assert sorted(meta["trained_on"]) == sorted(p.name for p in list_studies([studies]))
    taught = [line for line in lines if line.startswith("teacher (prior + LiteMedSAM), process") and "100%" in line]
    for rank in (1, 2):
        assert any(f"process {rank} of 2" in line and "| 1/1 " in line for line in taught), taught
    assert sum(line.startswith("wrote ") for line in lines) == 1
    assert not list((tmp_path / "teacher_cache").glob("embeddings_*"))  # each process's spill folder is gone
    monkeypatch.setenv("MEDPROMPT_CACHE", str(tmp_path / "cache"))
    before = out.read_bytes()
    assert main(args) == 0  # the teachers' cells come from the cache the two processes wrote
    assert f"{out} is already trained: 2 steps of this run" in capsys.readouterr().out and out.read_bytes() == before


def test_a_finetune_round_under_torchrun_shares_the_unlabelled_studies(tmp_path: Path):
    """A 3D datastore, one corrected and two unlabelled studies, two processes: each teaches one unlabelled
    study, both train on the correction, rank 0 validates and serves one model trained on all three."""
    import shutil

    from medprompt.distributed import run_torchrun
    from medprompt.model.sam_checkpoint import load_net

    src, store = tmp_path / "src", tmp_path / "store"
    paths = write_sample_data(src, n=3, seed=5, shape=(48, 48, 32))
    final = store / "labels" / "final"
    final.mkdir(parents=True)
    for p in paths:
        shutil.copy2(p, store / p.name)
    for suffix in (".nii.gz", ".json"):
        shutil.copy2(src / "reference" / f"phantom_000{suffix}", final / f"phantom_000{suffix}")
    lines: list[str] = []
    run_torchrun(["train-finetune", "--studies", str(store), "--steps", "2", "--batch-size", "2", "--device", "cpu"],
                 WORLD, env={"OMP_NUM_THREADS": "1", "MEDPROMPT_CACHE": str(tmp_path / "cache")}, on_line=lines.append)
    taught = [line for line in lines if line.startswith("teacher (prior + LiteMedSAM), process") and "100%" in line]
    for rank in (1, 2):
        assert any(f"process {rank} of 2" in line and "| 1/1 " in line for line in taught), taught
    assert sum(line.startswith("validation Dice on phantom_000.nii.gz") for line in lines) == 1  # rank 0 alone
    _, meta = load_net(store / "model" / "medprompt.pt")
    assert sorted(meta["trained_on"]) == [p.name for p in paths]
    assert not list((store / "model" / "finetune_work").glob("embeddings_*"))


def test_multi_gpu_request_picks_gpus_and_falls_back_to_one_process(monkeypatch, caplog):
    from medprompt.trainers import round_task

    caplog.set_level(logging.INFO, logger=round_task.logger.name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert round_task.request_gpus({"multi_gpu": True, "gpus": "0,1"}) == []
    assert "no CUDA GPU here: the round runs in one process" in caplog.text
    assert round_task.request_gpus({}) == [] and round_task.request_gpus({"multi_gpu": "false"}) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert round_task.request_gpus({"multi_gpu": True}) == [0, 1, 2, 3]
    assert round_task.request_gpus({"multi_gpu": "true", "gpus": "3,1"}) == [3, 1]
    assert round_task.request_gpus({"multi_gpu": True, "gpus": "2"}) == []
    for bad in ({"multi_gpu": "yes"}, {"multi_gpu": True, "gpus": "0,4"}, {"multi_gpu": True, "gpus": "0,0"},
                {"multi_gpu": True, "gpus": "a,b"}):
        with pytest.raises(InputError):
            round_task.request_gpus(bad)
    launched: list = []
    monkeypatch.setattr("medprompt.distributed.run_torchrun", lambda args, n, env, on_line: launched.append((n, env)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    round_task.run_on_gpus(["train-zero-shot"], [3, 1])
    assert launched == [(2, {"CUDA_VISIBLE_DEVICES": "7,5"})]
