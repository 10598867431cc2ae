"""VL-PRM-3B: Qwen2.5-VL-3B fine-tuned as a PRM on VL-PRM300K with the paper's hyperparameters.

    python -m jaxprm.train --config configs/qwen2_5_vl_3b.py \
        --config.model.hf_dir=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.records=/path/to/VL-PRM300K --config.data.image_root=/path/to/images \
        --config.workdir=runs/vlprm_3b
"""
from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/vlprm_3b"
    # base.py's defaults are the paper's optimizer, epochs and batch size, and model.init="hf" (weights
    # from --config.model.hf_dir)
    c.model.remat = "dots_no_batch"
    c.data.source = "records"
    c.data.format = "vlprm300k"
    # "": the importer's default, the authors' released labels (judge's first error; see
    # jaxprm.data.formats.vlprm300k); "hybrid", "mc", ... relabel by name
    c.data.label_rule = ""
    # data: measured by bench/pipeline_bench.py on VL-PRM300K-shaped examples (256-1280 image tokens,
    # 4-24 steps; README "Input pipeline"). Several examples per row, chosen by the lookahead packer from
    # 8 x 32 pending ones so that every row is ~95% full of tokens and ~91% of patches (one example per row
    # in the old (2048, 4096) x (4096, 16384) buckets: 45% and 16%)
    c.data.packing = True
    c.data.pack_buffer = 8.0  # x rows per host = examples held for the lookahead packer (256 at 32 rows)
    c.data.seq_buckets = (4096,)  # holds the longest example (3.1k tokens in the bench)
    # rows carry ~1.4 patches per token on this data; buckets ~20% apart keep patch padding < 10% for
    # other mixes too (the largest holds two 1280-token images)
    c.data.patch_buckets = (5120, 6144, 7168, 8192, 10240, 12288)
    c.data.max_steps = 36  # label slots per row: ~2.2 examples x 14 steps, up to 24 for one example
    # pixel_dtype "auto" (base): bfloat16, as model.dtype is; worker processes from the measured rate
    # one worker process does ~60 examples/s on one core (bench, this data); a 3B step at 45% MFU on an
    # H100 takes ~13 examples/s (0.21 workers); 0.5 per chip leaves room for Qwen's larger tokenizer and
    # harder-to-decode images: 4 workers on an 8-GPU host
    c.data.worker_count = -1
    c.data.workers_per_chip = 0.5
    # the paper's 64 examples per optimizer step: packed rows hold ~2.1 of these examples (bench above;
    # training logs data/examples_per_batch), so 32 rows; micro-batches of 8 rows as before (memory:
    # README "Pod sizing")
    c.train.batch_size = 32
    c.train.grad_accum = 4
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
