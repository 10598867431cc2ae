"""bench/train_bench.py runs end to end (tiny shapes, CPU) and reports what it promises."""
from bench.train_bench import main


def test_train_bench_smoke(tmp_path):
    out = main(["--model", "tiny", "--batch", "8", "--seq", "256", "--image", "56", "--iters", "1",
                "--remat", "full", "--json", str(tmp_path / "r.json")])
    j = out["jax"]
    assert j["tokens_per_s"] > 0 and j["step_s"] > 0 and j["loss"] > 0
    assert (tmp_path / "r.json").exists()


def test_memory_bench_counts_the_state_it_compiles(tmp_path):
    """bench/memory_bench.py on the local backend: XLA's argument bytes are the weights, optimizer
    state and batch it was given, and bf16 weights + moments take about half of fp32's."""
    from bench.memory_bench import main as memory

    common = ["--model", "tiny", "--batch", "2", "--seq", "256", "--image", "56"]
    f32 = memory(common + ["--json", str(tmp_path / "m.json")])
    b16 = memory(common + ["--param-dtype", "bfloat16", "--mu-dtype", "bfloat16"])
    assert f32["fits"] and b16["fits"] and (tmp_path / "m.json").exists()
    for r in (f32, b16):
        state = r["weights_gib"] + r["optimizer_gib"]
        assert state <= r["arguments_gib"] < state * 1.2 + 0.01, r  # + the batch
        assert r["peak_gib"] >= r["arguments_gib"]
    assert 0.45 < (b16["weights_gib"] + b16["optimizer_gib"]) / (f32["weights_gib"] + f32["optimizer_gib"]) < 0.55
