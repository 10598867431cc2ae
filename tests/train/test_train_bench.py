"""bench/train_bench.py runs end to end (tiny shapes, CPU) and reports what it promises."""
from bench.train_bench import main


def test_train_bench_smoke(tmp_path):
    out = main(["--model", "tiny", "--batch", "8", "--seq", "256", "--image", "56", "--iters", "1",
                "--remat", "full", "--json", str(tmp_path / "r.json")])
    j = out["jax"]
    assert j["tokens_per_s"] > 0 and j["step_s"] > 0 and j["loss"] > 0
    assert (tmp_path / "r.json").exists()
