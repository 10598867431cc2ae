"""The whole benchmark suite in one command, for the moment a GPU or TPU host is at hand (issue 19).

    bash bench/accelerator_suite.sh --out runs/bench            # on the accelerator host, < 10 minutes
    python bench/accelerator_suite.py --smoke --out /tmp/suite  # tiny shapes on CPU (the suite's test)

Runs, each in its own process (so one bench's memory is freed before the next, and a crash or a
timeout is recorded instead of stopping the suite):
- train 3B next to transformers (B=4 x 2048, 448 px image, full remat) and 7B on one card
  (bf16 weights + stochastic rounding, bf16 Adam first moment);
- score 3B and 7B next to transformers (B=8 x 1024, 448 px image), and 3B best-of-N with a shared
  512-token prefix;
- memory of the 7B one-card train step compiled for the real device;
- the host-side cost of scoring batches (``bench/host_bench.py``).
Writes ``suite.json`` (every bench's own JSON) and ``suite.md`` (one table) under ``--out``. Each run's
stdout/stderr tail is kept in the JSON; ``--only`` picks runs by name. Without torch the ``--hf``
comparisons are skipped and said so.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL = [
    ("train_3b", "train_bench.py", ["--model", "qwen2.5-vl-3b", "--batch", "4", "--seq", "2048", "--image", "448",
                                    "--remat", "full", "--hf"]),
    ("train_7b_one_card", "train_bench.py", ["--model", "qwen2.5-vl-7b", "--batch", "4", "--seq", "2048", "--image",
                                             "448", "--remat", "full", "--param-dtype", "bfloat16",
                                             "--mu-dtype", "bfloat16"]),
    ("score_3b", "score_bench.py", ["--model", "qwen2.5-vl-3b", "--batch", "8", "--seq", "1024", "--image", "448",
                                    "--hf"]),
    ("score_7b", "score_bench.py", ["--model", "qwen2.5-vl-7b", "--batch", "8", "--seq", "1024", "--image", "448",
                                    "--hf"]),
    ("score_3b_shared_prefix", "score_bench.py", ["--model", "qwen2.5-vl-3b", "--batch", "8", "--seq", "1024",
                                                  "--image", "448", "--shared-prefix", "512"]),
    ("memory_7b_one_card", "memory_bench.py", ["--model", "qwen2.5-vl-7b", "--batch", "4", "--seq", "2048",
                                               "--param-dtype", "bfloat16", "--mu-dtype", "bfloat16"]),
]
SMOKE = [
    ("train_tiny", "train_bench.py", ["--model", "tiny", "--batch", "2", "--seq", "256", "--image", "56",
                                      "--iters", "1", "--dtype", "float32"]),
    ("score_tiny", "score_bench.py", ["--model", "tiny", "--batch", "2", "--seq", "128", "--image", "56",
                                      "--dtype", "float32", "--iters", "1", "--warmup", "0", "--steps", "4", "--hf"]),
    ("memory_tiny", "memory_bench.py", ["--model", "tiny", "--batch", "2", "--seq", "256", "--image", "56"]),
]


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _run(name: str, script: str, args: list[str], out: str, timeout: float) -> dict:
    js = os.path.join(out, f"{name}.json")
    if script != "host_bench.py":
        args = [*args, "--json", js]
    else:
        args = [*args, "--out", js]
    if "--hf" in args and not _has_torch():
        args = [a for a in args if a != "--hf"]
        note = "torch not installed: transformers comparison skipped"
    else:
        note = ""
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    env = dict(os.environ)
    # the benches run on the host's real devices, not on CPU devices a test harness may have forced
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    t = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        status = "ok" if p.returncode == 0 else f"exit {p.returncode}"
        log = (p.stdout + p.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        status = f"timeout after {timeout:.0f} s"
        log = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-4000:] \
            if isinstance(e.stdout, (bytes, type(None))) else str(e.stdout)[-4000:]
    res = None
    if os.path.exists(js):
        with open(js, encoding="utf-8") as f:
            res = json.load(f)
    return {"name": name, "command": " ".join(["python", f"bench/{script}", *args]), "status": status,
            "wall_s": round(time.time() - t, 1), "note": note, "result": res, "log_tail": log}


def _row(r: dict) -> list[str]:
    res = r["result"] or {}
    jx = res.get("jax", {}) if isinstance(res.get("jax"), dict) else {}
    hf = res.get("hf", {}) if isinstance(res.get("hf"), dict) else {}
    fwd = jx.get("forward", jx)
    tps = fwd.get("tokens_per_s") if isinstance(fwd, dict) else None
    cells = {
        "jax tokens/s": f"{tps:.0f}" if tps else "",
        "MFU": f"{jx['mfu']:.1%}" if "mfu" in jx else "",
        "hf tokens/s": f"{hf['tokens_per_s']:.0f}" if hf.get("tokens_per_s") else "",
        "speedup": (f"{res['speedup']:.2f}x" if "speedup" in res else
                    f"{res['speedup_forward']:.2f}x" if "speedup_forward" in res else ""),
        "peak GiB": f"{res['peak_gib']:.1f}" if isinstance(res.get("peak_gib"), (int, float)) else "",
    }
    return [r["name"], r["status"], *cells.values(), f"{r['wall_s']:.0f}", r["note"]]


HEADERS = ["run", "status", "jax tokens/s", "MFU", "hf tokens/s", "speedup", "peak GiB", "wall s", "note"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU): checks the suite runs end to end")
    ap.add_argument("--only", default="", help="comma-separated run names")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per run (default 240, smoke 300)")
    ap.add_argument("--no-host", action="store_true", help="skip bench/host_bench.py")
    args = ap.parse_args(argv)
    runs = list(SMOKE if args.smoke else FULL)
    if not args.no_host and not args.smoke:
        runs.append(("host_scoring", "host_bench.py", []))
    if args.only:
        want = {x.strip() for x in args.only.split(",") if x.strip()}
        unknown = want - {r[0] for r in runs}
        if unknown:
            ap.error(f"unknown run(s) {sorted(unknown)}; choose from {[r[0] for r in runs]}")
        runs = [r for r in runs if r[0] in want]
    timeout = args.timeout or (300.0 if args.smoke else 240.0)
    os.makedirs(args.out, exist_ok=True)
    import jax

    dev = jax.devices()[0]
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": f"{jax.default_backend()} {dev.device_kind} x{jax.device_count()}",
              "jax": jax.__version__, "smoke": bool(args.smoke)}
    results = []
    for name, script, a in runs:
        print(f"[suite] {name}: python bench/{script} {' '.join(a)}", flush=True)
        r = _run(name, script, a, args.out, timeout)
        print(f"[suite] {name}: {r['status']} in {r['wall_s']} s", flush=True)
        results.append(r)
    suite = {**header, "runs": results}
    with open(os.path.join(args.out, "suite.json"), "w", encoding="utf-8") as f:
        json.dump(suite, f, indent=1)
    from jaxprm.reporting import markdown_table

    md = (f"Benchmark suite, {header['date']}, {header['device']}, jax {header['jax']}"
          + (" (smoke: tiny shapes)" if args.smoke else "") + "\n\n"
          + markdown_table(HEADERS, [_row(r) for r in results]) + "\n\nCommands:\n\n"
          + "\n".join(f"- `{r['command']}`" for r in results) + "\n")
    with open(os.path.join(args.out, "suite.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return suite


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
