"""Benchmark: N concurrent drafts against one `medprompt serve` on loopback: all answered? latency and memory.

Starts the server on a fresh phantom datastore (in a temporary folder, removed when every request was
answered, kept with its server.log otherwise), waits for it, sends --requests infer requests at once
from --clients threads (images round-robin, the Synapse 8 by default), and prints per-request latency
(p50, p95, max), the wall time, the failures, and the server's peak RSS (the process and its children,
sampled every 0.1 s). Bounded: --requests at most 200, and every request times out after --timeout
seconds. Loopback only.

    .venv/bin/python benchmarks/load.py                      # 20 requests, prior, refine none
    .venv/bin/python benchmarks/load.py --refine sam         # LiteMedSAM draws each mask (cold cache)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--clients", type=int, default=20, help="concurrent client threads")
    p.add_argument("--images", type=int, default=4, help="phantoms in the datastore")
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 80])
    p.add_argument("--model", default="medprompt_prior")
    p.add_argument("--refine", default="none", choices=["none", "sam"])
    p.add_argument("--prompts", default=None, help="comma-separated (default: the Synapse 8)")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    if not 1 <= args.requests <= 200:
        sys.exit("error: --requests must lie in 1..200")

    from medprompt.phantoms import write_sample_data

    root = Path(tempfile.mkdtemp(prefix="medprompt_load_"))
    studies = root / "studies"
    write_sample_data(studies, n=args.images, shape=tuple(args.shape))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    command = [str(Path(sys.executable).parent / "medprompt"), "serve", "--studies", str(studies),
               "--port", str(port), "--conf", "model_dir", str(root / "model"), "--conf", "refine", args.refine]
    server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MEDPROMPT_CACHE": str(root / "cache")})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"error: the server did not start; see {root / 'server.log'}")
            time.sleep(0.5)
        proc = psutil.Process(server.pid)
        idle = tree_rss(proc)
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(proc))
                time.sleep(0.1)

        images = [f"phantom_{i:03d}" for i in range(args.images)]
        params = json.dumps({"prompts": args.prompts} if args.prompts else {})

        def one(i: int) -> tuple[float, int, str]:
            start = time.perf_counter()
            try:
                r = requests.post(f"{url}/infer/{args.model}?image={images[i % len(images)]}&output=json",
                                  data={"params": params}, timeout=args.timeout)
                return time.perf_counter() - start, r.status_code, "" if r.ok else r.text[:200]
            except requests.RequestException as error:
                return time.perf_counter() - start, 0, str(error)[:200]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    latency = np.array([r[0] for r in results])
    failed = [r for r in results if r[1] != 200]
    print(f"{args.requests} requests from {args.clients} clients, {args.model}, refine {args.refine}, "
          f"{args.images} phantoms {'x'.join(map(str, args.shape))}, {os.cpu_count()} CPUs")
    print(f"answered 200: {args.requests - len(failed)}/{args.requests}; wall {wall:.1f} s; "
          f"throughput {args.requests / wall:.2f} drafts/s")
    print(f"latency p50 {np.percentile(latency, 50):.2f} s, p95 {np.percentile(latency, 95):.2f} s, "
          f"max {latency.max():.2f} s")
    print(f"server RSS idle {idle / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB")
    for _, status, text in failed[:5]:
        print(f"failed: {status} {text}")
    if failed:
        sys.exit(f"the server's log: {root / 'server.log'}")
    shutil.rmtree(root, ignore_errors=True)  # the datastore and, with LiteMedSAM, ~0.5 GB of embeddings


if __name__ == "__main__":
    main()
