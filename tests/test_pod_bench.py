"""Ahead-of-time compilation for a TPU pod (issues 14 item 3 and 19 item 3), with libtpu's compiler
and no TPU: the sharded train step and the scoring forward of a config compile for a 4-chip v5p
slice, and the compiled programs contain the Pallas splash kernels (forward, dq, dkv), not a silent
fallback to XLA attention. Each run is a subprocess (the TPU plugin stays out of the test process)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason='needs the TPU compiler: pip install -e ".[tpu-aot]" (no TPU needed)')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny model on a (data=1, fsdp=2, tensor=2) mesh of the 4 chips; 8 rows of 256 tokens
TINY = ["--config", "configs/tiny.py", "--model", "tiny", "--topology", "v5p:2x2x1",
        "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.train.batch_size=8", "--config.train.grad_accum=1", "--seq", "256"]


def pod_bench(tmp_path, *args):
    out = tmp_path / "row.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "bench/pod_bench.py", *TINY, *args, "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    row = json.loads(out.read_text()) if out.exists() else None
    return proc, row


def kinds(kernels: dict) -> set[str]:
    return {k for k in ("fwd", "dq", "dkv") if any(f"_{k}_" in name for name in kernels)}


def test_train_step_compiles_for_a_tpu_pod_with_the_splash_kernels(tmp_path):
    proc, row = pod_bench(tmp_path, "--check-kernels")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert row["fits"] and row["chips"] == 4
    assert row["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert row["rows_per_chip"] == 4  # 8 rows over data x fsdp = 2
    assert kinds(row["kernels"]) == {"fwd", "dq", "dkv"}, row["kernels"]
    assert 0 < row["arguments_gib"] < row["peak_gib"] < row["hbm_gib"]


def test_scoring_forward_compiles_with_the_kernel(tmp_path):
    proc, row = pod_bench(tmp_path, "--score", "--check-kernels")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert row["program"] == "score forward"
    assert kinds(row["kernels"]) == {"fwd"}, row["kernels"]


def test_config_overrides_are_read_as_train_reads_them(tmp_path):
    """A config field that does not exist is a usage error naming it (exit 2), as with jaxprm.train."""
    proc, row = pod_bench(tmp_path, "--config.mesh.fdsp=2")
    assert proc.returncode == 2 and row is None
    assert "no such config field" in proc.stderr and "mesh.fdsp" in proc.stderr


def test_check_kernels_fails_on_a_fallback_to_xla(tmp_path):
    """With XLA attention forced, the compiled program has no kernel, and the check says so."""
    proc, row = pod_bench(tmp_path, "--config.model.attn_impl=xla", "--check-kernels")
    assert proc.returncode == 1
    assert row["fits"] and row["kernels"] == {}
    assert "fell back to XLA" in proc.stderr
