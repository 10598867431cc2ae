"""Load test of ``python -m jaxprm.serve``: K concurrent clients on localhost for a bounded time.

Each client is a thread with its own keep-alive HTTP connection sending ``POST /v1/score`` (one
embedded puzzle: image + question + steps) in a loop. Reported: requests/s, p50 / p99 latency, the
mean batch fill (solutions per device call, from the server's ``/metrics``), compilations during the
run (should be 0), and the ratio to in-process ``PRM.score_batch`` throughput on the same inputs,
measured in this process with the same buckets and batches of ``--batch-size`` (what the server's
batcher forms at full load). Baseline and load alternate in ``--rounds`` rounds, so a machine shared
with other work drifts into both alike. Target: >= 0.8 at 16 clients.

    python bench/serve_bench.py                         # a tiny random PRM exported to a temp dir
    python bench/serve_bench.py --prm runs/tiny/export --clients 16 --duration 30

The PRM defaults to a tiny random Qwen2.5-VL-shaped one (the shapes of configs/tiny.py; scores do not
matter for throughput). The server gets the buckets the embedded puzzles need (``--length-buckets 768``,
``--patch-buckets 64``).
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BUCKETS = ["--length-buckets", "768", "--prefix-buckets", "512,768", "--suffix-buckets", "256", "--patch-buckets", "64"]


def tiny_export(out_dir: str) -> str:
    """A tiny random PRM (the configs/tiny.py shapes) exported to ``out_dir``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm import checkpointing as ck
    from jaxprm.data import synthetic as syn
    from jaxprm.data.preprocess import ImageProcessor
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL

    tok = syn.build_synthetic_tokenizer()
    cfg = syn.tiny_model_config(tok)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PRMModel(Qwen25VL(cfg), ck.default_spec(tok, head="linear"))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(x.dtype)), state)
    return ck.export_hf(nnx.merge(graphdef, state), tok, ImageProcessor(), out_dir)


def load_local(prm_dir: str, batch_size: int):
    import jaxprm

    prm = jaxprm.load_prm(prm_dir, batch_size=batch_size, length_buckets=(768,), prefix_buckets=(512, 768),
                          suffix_buckets=(256,), patch_buckets=(64,))
    prm.warmup(text_only=False, shared=False)
    return prm


def in_process(prm, items, batch_size: int, seconds: float) -> float:
    """Solutions/s of ``PRM.score_batch`` over ``items`` in batches of ``batch_size``."""
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = [items[(i + k) % len(items)] for k in range(batch_size)]
        prm.score_batch(chunk)
        n += len(chunk)
        i += batch_size
    return n / (time.perf_counter() - t0)


def start_server(prm_dir: str, args) -> tuple[subprocess.Popen, str, str]:
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "jaxprm.serve", "--prm", prm_dir, "--port", "0", "--batch-size", str(args.batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--warmup", "full", "--log-level", "warning", *BUCKETS]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.time() + 600
    while time.time() < deadline:
        text = open(log.name).read()
        m = re.search(r"serving \S+ on http://([\d.]+):(\d+)", text)
        if m:
            return proc, m.group(1), m.group(2)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def metrics(host, port) -> dict:
    from jaxprm.serve.metrics import parse_prometheus

    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.request("GET", "/metrics")
    return parse_prometheus(c.getresponse().read().decode())


def load(host, port, bodies, clients: int, seconds: float):
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)

    def client(k):
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        i = k
        barrier.wait()
        while not stop.is_set():
            body = bodies[i % len(bodies)]
            t = time.perf_counter()
            conn.request("POST", "/v1/score", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors[k] += 1
            lat[k].append(time.perf_counter() - t)
            i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0
    all_lat = np.asarray([x for l in lat for x in l])
    return len(all_lat) / wall, all_lat, sum(errors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prm", default=None, help="PRM directory (default: a tiny random export in a temp dir)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load in all (after a 3 s warm-up load)")
    p.add_argument("--baseline-seconds", type=float, default=15.0, help="seconds of in-process scoring in all")
    p.add_argument("--rounds", type=int, default=3, help="the baseline and the load alternate this many times")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--puzzles", type=int, default=64)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)

    from jaxprm.data import synthetic as syn

    prm_dir = args.prm or tiny_export(os.path.join(tempfile.mkdtemp(prefix="serve_bench_"), "prm"))
    recs = syn.generate_records(args.puzzles, seed=11)
    items = [(r.images[0], r.question, [s.text for s in r.steps]) for r in recs]
    bodies = [json.dumps({"image": base64.b64encode(im).decode(), "question": q, "steps": st, "aggregations": []})
              for im, q, st in items]

    # the in-process baseline and the load alternate in --rounds rounds (a 2-core machine shared with
    # other work drifts); the ratio is of the totals
    local = load_local(prm_dir, args.batch_size)
    proc, host, port = start_server(prm_dir, args)
    bases, rates, lats, errors = [], [], [], 0
    try:
        load(host, port, bodies, args.clients, 3.0)  # warm the connections and the batcher
        m0 = metrics(host, port)
        for _ in range(args.rounds):
            bases.append(in_process(local, items, args.batch_size, args.baseline_seconds / args.rounds))
            rps_r, lat_r, err_r = load(host, port, bodies, args.clients, args.duration / args.rounds)
            rates.append(rps_r)
            lats.append(lat_r)
            errors += err_r
            print(f"round {len(rates)}: in-process {bases[-1]:.1f} solutions/s, server {rps_r:.1f} requests/s",
                  flush=True)
        m1 = metrics(host, port)
    finally:
        proc.terminate()
        proc.wait(60)
    base, rps, lat = float(np.mean(bases)), float(np.mean(rates)), np.concatenate(lats)
    k = (("kind", "items"),)
    batches = m1[("jaxprm_batches_total", k)] - m0[("jaxprm_batches_total", k)]
    fill = (m1[("jaxprm_batch_items_total", k)] - m0[("jaxprm_batch_items_total", k)]) / max(batches, 1)
    compiles = m1[("jaxprm_compilations", ())] - m0[("jaxprm_compilations", ())]
    res = {"clients": args.clients, "duration_s": args.duration, "requests_per_s": rps,
           "p50_ms": float(np.percentile(lat, 50) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000),
           "mean_batch_fill": fill, "compilations_during_load": compiles, "errors": errors,
           "in_process_per_s": base, "rounds": {"in_process_per_s": bases, "requests_per_s": rates},
           "ratio_to_in_process": rps / base, "cpus": os.cpu_count()}
    print(f"{args.clients} clients, {args.duration:.0f} s: {rps:.1f} requests/s, p50 {res['p50_ms']:.0f} ms, "
          f"p99 {res['p99_ms']:.0f} ms, mean batch fill {fill:.2f}, {int(compiles)} compilations, {errors} errors; "
          f"{res['ratio_to_in_process']:.2f}x in-process throughput", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
