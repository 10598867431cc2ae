"""Command line of the scoring server::

    python -m jaxprm.serve --prm DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]
        [--length-buckets 768,1024 --patch-buckets 256 --batch-size 8] [--warmup all|full|none]

Loads the PRM (anything ``jaxprm.load_prm`` accepts), compiles the scorer's buckets (``--warmup``: the
programs ``/v1/score`` and ``/pooling`` need, ``all`` adds the shared-prefix and guided-search ones),
binds (127.0.0.1 unless ``--host`` says otherwise; ``--port 0`` picks a free port) and prints one line
``jaxprm.serve: serving NAME on http://HOST:PORT`` when it accepts requests.

SIGTERM / Ctrl-C: new requests get 503 (``/health`` too, so a load balancer stops sending), the
requests in flight finish (at most ``--drain-timeout`` seconds), then the server exits 0. A second
signal exits at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

__all__ = ["main", "build_parser"]

log = logging.getLogger("jaxprm.serve")


def _ints(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def build_parser() -> argparse.ArgumentParser:
    from jaxprm.serve.inputs import Limits

    d = Limits()
    p = argparse.ArgumentParser(prog="python -m jaxprm.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prm", required=True, help="a jaxprm export, training workdir or HF VL-PRM directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (or X-API-Key) on every endpoint but /health; "
                        "default: the JAXPRM_API_KEY environment variable, if set")
    p.add_argument("--served-model-name", default=None, help="model id in responses (default: the directory name)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    g = p.add_argument_group("scorer buckets (the shapes compiled; pick them for your workload)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per device call at most")
    g.add_argument("--batch-buckets", type=_ints, default=None, help="row buckets (default: powers of 2 up to --batch-size)")
    g.add_argument("--length-buckets", type=_ints, default=None, help="token-length buckets of whole solutions")
    g.add_argument("--prefix-buckets", type=_ints, default=None, help="shared-prefix / K/V-cache buckets")
    g.add_argument("--suffix-buckets", type=_ints, default=None, help="candidate-continuation buckets")
    g.add_argument("--patch-buckets", type=_ints, default=None, help="vision-patch buckets per row")
    g.add_argument("--max-length", type=int, default=None, help="tokens per solution at most (default: largest length bucket)")
    g.add_argument("--warmup", choices=("all", "full", "none"), default="all",
                   help="compile before serving: 'full' = whole-solution scoring (/v1/score steps|items, /pooling, "
                        "/classify); 'all' adds candidates (shared prefix) and /v1/guide (incremental)")
    g.add_argument("--warmup-text-only", action=argparse.BooleanOptionalAction, default=True,
                   help="also compile the text-only (no image) variants")
    b = p.add_argument_group("batching and sessions")
    b.add_argument("--max-batch", type=int, default=None, help="solutions gathered per device call (default: --batch-size)")
    b.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the first request waits for others")
    b.add_argument("--max-sessions", type=int, default=64, help="guide sessions kept (LRU)")
    lim = p.add_argument_group("request limits (over them: 413)")
    lim.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    lim.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="width x height per image")
    lim.add_argument("--max-images", type=int, default=d.max_images, help="images per solution")
    lim.add_argument("--max-steps", type=int, default=d.max_steps, help="steps per solution")
    lim.add_argument("--max-candidates", type=int, default=d.max_candidates, help="candidates per problem")
    lim.add_argument("--max-items", type=int, default=d.max_items, help="solutions per request")
    lim.add_argument("--max-step-chars", type=int, default=d.max_step_chars, help="characters per step / question")
    lim.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens,
                     help="question + step + image tokens per request")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _limits(args):
    from jaxprm.serve.inputs import Limits

    return Limits(max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                  max_images=args.max_images, max_steps=args.max_steps, max_candidates=args.max_candidates,
                  max_items=args.max_items, max_step_chars=args.max_step_chars,
                  max_request_tokens=args.max_request_tokens)


def _scorer_kwargs(args) -> dict:
    kw = {"batch_size": args.batch_size}
    for name in ("batch_buckets", "length_buckets", "prefix_buckets", "suffix_buckets", "patch_buckets"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    if args.max_length is not None:
        kw["max_length"] = args.max_length
    return kw


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bad = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
           if k.startswith("max_") and v is not None and not isinstance(v, (tuple, str)) and v <= 0]
    if bad:
        print(f"jaxprm.serve: {', '.join(bad)} must be positive", file=sys.stderr)
        return 2
    if not os.path.isdir(args.prm):
        print(f"jaxprm.serve: --prm {args.prm!r} is not a directory (a jaxprm export, workdir or HF PRM)",
              file=sys.stderr)
        return 2
    api_key = args.api_key if args.api_key is not None else os.environ.get("JAXPRM_API_KEY") or None

    import uvicorn

    from jaxprm.scoring import load_prm
    from jaxprm.serve.app import create_app

    t0 = time.time()
    try:
        prm = load_prm(args.prm, dtype=args.dtype, **_scorer_kwargs(args))
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"jaxprm.serve: cannot load {args.prm!r}: {e}", file=sys.stderr)
        return 2
    n = 0
    if args.warmup != "none":
        full_only = args.warmup == "full"
        n = prm.warmup(text_only=args.warmup_text_only, shared=not full_only, incremental=not full_only)
    log.info("loaded %s in %.1f s (%d programs compiled)", args.prm, time.time() - t0, n)

    name = args.served_model_name or os.path.basename(os.path.normpath(args.prm))
    app = create_app(prm, model_name=name, limits=_limits(args), api_key=api_key, max_batch=args.max_batch,
                     max_wait_ms=args.max_wait_ms, max_sessions=args.max_sessions)
    state = app.state.jaxprm

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"jaxprm.serve: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    sock.listen(2048)
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        """uvicorn's server, draining on the first SIGTERM/SIGINT: new requests get 503 while the
        in-flight ones finish, then it exits (a second signal exits at once)."""

        drain_started: float | None = None

        def handle_exit(self, sig, frame):  # noqa: ARG002 - uvicorn's signature
            if state.draining:
                self.should_exit = self.force_exit = True
                return
            state.draining = True
            self.drain_started = time.monotonic()
            log.info("signal %s: draining %d in-flight request(s)", sig, state.inflight)

        async def on_tick(self, counter: int) -> bool:
            if state.draining and not self.should_exit:
                if state.inflight <= 0 or time.monotonic() - self.drain_started > args.drain_timeout:
                    self.should_exit = True
            return await super().on_tick(counter)

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"jaxprm.serve: serving {name} on http://{host if ':' not in host else f'[{host}]'}:{port}",
                      flush=True)

    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_keep_alive=30,
                            timeout_graceful_shutdown=max(1, int(args.drain_timeout)))
    server = Server(config)
    server.run(sockets=[sock])
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
