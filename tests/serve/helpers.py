"""Start a real ``python -m jaxprm.serve`` process on a free localhost port (``--port 0``: the server
prints the port it bound) and talk to it with the standard library."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The synthetic prompts are ~500-660 tokens with a 112x112 image (64 patches); a guided search's cache
# grows past 512, so the prefix buckets go to 768.
BUCKETS = dict(batch_size=8, batch_buckets=(1, 8), length_buckets=(768,), prefix_buckets=(512, 768),
               suffix_buckets=(256,), patch_buckets=(64,))


def bucket_args(b=BUCKETS) -> list[str]:
    out = []
    for k, v in b.items():
        out += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return out


class Server:
    def __init__(self, proc, url, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server(prm_dir, log_path, *args, cache_dir=None, env=None, timeout=240) -> Server:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
             JAX_DEFAULT_MATMUL_PRECISION="highest", TOKENIZERS_PARALLELISM="false")
    e.pop("JAXPRM_API_KEY", None)
    if cache_dir:  # servers of one test session share compiled programs
        e.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    e.update(env or {})
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "jaxprm.serve", "--prm", str(prm_dir), "--port", "0", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=e, cwd=REPO)
    log.close()
    deadline = time.time() + timeout
    server = Server(proc, None, log_path)
    while time.time() < deadline:
        m = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)", server.log())
        if m:
            server.url = m.group(1)
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the server did not start in {timeout} s:\n{server.log()[-3000:]}")


def call(url, path, body=None, *, raw=None, method=None, key=None, headers=None, timeout=120):
    """(status, parsed JSON or text) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json"} if data is not None else {}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    req = urllib.request.Request(url + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text
