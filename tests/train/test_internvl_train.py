"""Training on the InternVL backbone (issue 15 item 5): ``python -m jaxprm.train`` with a tiny random
InternVL (``configs/internvl_tiny.py``) through the same pipeline (packing, buckets: tiles per row) and
sharding rules. Train as you score: a training batch holds exactly what ``PRM.score`` encodes for the
record (ids, 1D positions, label positions, tiles) and the model scores it the same; packing gives the
same per-example loss as one example per row; the export loads with ``load_prm`` and the in-training
eval equals ``PRM.score_batch`` on it; an exported InternVL directory trains again with ``model.init="hf"``."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxprm import checkpointing as ckpt
from jaxprm.data.pipeline import make_loader, pad_batch
from jaxprm.data.tfds_builder import read_records
from jaxprm.models.internvl import InternVL
from jaxprm.models.prm import PRMModel, step_probs
from jaxprm.scoring.prm import PRM

# image sizes of the rows: 1 tile (a 56 px square) or a grid of 56 px tiles + a thumbnail (3 to 5 tiles)
SIZES = [(112, 56), (56, 56), (56, 168), (84, 84), (168, 56), (56, 112), (112, 56), (56, 56)]
QUESTIONS = ["How many red squares are in the picture?", "What is the sum of the numbers shown?"]
STEPS = [["I count the red squares: there are 3.", "Each square has 4 sides, so 3 x 4 = 12.", "The answer is 3."],
         ["The numbers are 4 and 7.", "4 + 7 = 11.", "So the sum is 12.", "The answer is 12."]]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """VisualPRM400K conversation rows (the published layout: system turn, "### Question:" + first step,
    "+"/"-" turns) with images of several aspect ratios: (records file, image root)."""
    root = tmp_path_factory.mktemp("visualprm400k")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        q, steps = QUESTIONS[i % 2], STEPS[i % 2][: 2 + i % 3]
        conv = [{"from": "system", "value": "You are a process supervision model."},
                {"from": "human", "value": f"### Question:\n<image>\n{q}\n\n### Solution Process:\n{steps[0]}"}]
        for j, s in enumerate(steps):
            if j:
                conv.append({"from": "human", "value": s})
            conv.append({"from": "gpt", "value": "-" if (i + j) % 3 == 2 else "+"})
        lines.append(json.dumps({"id": f"row{i}", "image": f"{i}.png", "conversations": conv}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "train.jsonl"), str(root / "images")


def _config(workdir, records=None, image_root=None, **train):
    from configs import internvl_tiny

    c = internvl_tiny.get_config()
    c.workdir = str(workdir)
    if records is not None:
        c.data.source, c.data.format = "records", "visualprm400k"
        c.data.records, c.data.image_root, c.data.val_fraction = records, image_root, 0.0
        c.data.seq_buckets, c.data.patch_buckets = (256, 1024), (4, 16)
        c.data.max_images = 4  # so that rows can pack several examples
    else:
        c.data.synthetic_train, c.data.synthetic_eval = 16, 8
    c.train.batch_size = 4
    c.train.progress = False
    c.train.export = True
    c.train.eval_every = 1000
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _prm(c, cfg, tok, ip):
    model = PRMModel(InternVL(cfg, rngs=nnx.Rngs(0)), ckpt.default_spec(tok, prompt_style="visualprm"))
    return PRM(model, tok, ip, system_prompt=c.model.system_prompt or None, length_buckets=(256, 1024),
               patch_buckets=(4, 16), batch_size=8)


@jax.jit
def _probs(model, batch):
    return step_probs(model.step_logits(batch))


def _setup(c):
    from jaxprm.train import backbone_kind, model_assets, prepare_data, prompt_style

    assert backbone_kind(c) == "internvl" and prompt_style(c) == "visualprm"
    data_dir = prepare_data(c)
    cfg, tok, ip = model_assets(c)
    return data_dir, cfg, tok, ip


def test_training_batch_is_what_prm_score_encodes(rows, tmp_path):
    """Every row of a training batch holds the token ids, 1D positions, label positions, tiles and tile
    flags that ``PRM.score`` builds for the same record, the true labels are supervised, and the model
    run on the training batch gives the scores ``PRM.score_batch`` gives."""
    from jaxprm.train import pipeline_config

    c = _config(tmp_path / "w", *rows)
    data_dir, cfg, tok, ip = _setup(c)
    prm = _prm(c, cfg, tok, ip)
    recs = list(read_records(data_dir, "train"))
    assert len(recs) == len(SIZES)
    pc = dataclasses.replace(pipeline_config(c, train=True, seed=0), shuffle=False, batch_size=len(recs))
    assert pc.prompt_style == "visualprm" and pc.label_mode == "score"
    batch = next(iter(make_loader(data_dir, "train", tok, ip, cfg, pc)))
    assert batch["position_ids"].shape[0] == 1 and "image_grid_thw" not in batch
    items = []
    for r in range(len(recs)):
        rec = recs[int(batch["record_index"][r, 0])]
        steps = [s.text for s in rec.steps]
        pv, tiles = prm._images(rec.images)
        enc = prm._encode(pv, tiles, rec.question, steps)
        n, nt, k = int(batch["num_tokens"][r]), int(batch["num_patches"][r]), len(enc.label_positions)
        np.testing.assert_array_equal(batch["input_ids"][r, :n], enc.input_ids)
        np.testing.assert_array_equal(batch["position_ids"][0, r, :n], enc.position_ids[0])
        np.testing.assert_array_equal(batch["label_positions"][r, :k], enc.label_positions)
        np.testing.assert_array_equal(batch["labels"][r, :k], [s.label for s in rec.steps])
        assert (batch["labels"][r, k:] == -1).all() and k == len(steps)
        np.testing.assert_array_equal(batch["pixel_values"][r, :nt], pv)
        np.testing.assert_array_equal(batch["image_flags"][r], np.arange(batch["image_flags"].shape[1]) < nt)
        assert batch["image_tiles"][r, 0] == nt == len(pv) and (enc.input_ids == cfg.image_token_id).sum() == 4 * nt
        items.append((rec.images, rec.question, steps))
    assert min(batch["num_patches"]) == 1 and len(set(batch["num_patches"].tolist())) >= 3  # 1 tile, grids + thumbnail
    # multi-host hosts grow a batch to the largest bucket of any host: more tiles, flagged off
    grown = pad_batch(batch, num_patches=batch["pixel_values"].shape[1] + 3)
    assert grown["pixel_values"].shape[2:] == batch["pixel_values"].shape[2:]
    np.testing.assert_array_equal(grown["image_flags"][:, :-3], batch["image_flags"])
    assert not grown["image_flags"][:, -3:].any() and not grown["pixel_values"][:, -3:].any()
    probs = np.asarray(_probs(prm.model, {k: jnp.asarray(v) for k, v in batch.items()}))
    for r, scores in enumerate(prm.score_batch(items)):
        np.testing.assert_allclose(probs[r, : len(scores)], scores, atol=1e-5)


def test_packing_gives_the_same_per_example_loss(rows, tmp_path):
    """Packed rows (several examples, positions restarting, each example's tiles after the previous
    one's) give every step the logits, hence every example the loss, of one example per row."""
    from jaxprm.models.prm import step_loss
    from jaxprm.train import pipeline_config

    c = _config(tmp_path / "w", *rows)
    data_dir, cfg, tok, ip = _setup(c)
    model = _prm(c, cfg, tok, ip).model

    def per_example(packing):
        pc = dataclasses.replace(pipeline_config(c, train=True, seed=0), shuffle=False, batch_size=2,
                                 packing=packing, max_examples_per_row=4, drop_remainder=False)
        out, rows_used, most = {}, 0, 0
        for batch in make_loader(data_dir, "train", tok, ip, cfg, pc):
            logits = np.asarray(jax.jit(lambda m, b: m.step_logits(b))(model, {k: jnp.asarray(v) for k, v in batch.items()}))
            for r in range(batch["input_ids"].shape[0]):
                for j in range(int(batch["num_examples"][r])):
                    sel = batch["label_segment_ids"][r] == j + 1
                    lg, lab = logits[r][sel], batch["labels"][r][sel]
                    loss, _ = step_loss(lg, lab)
                    out[int(batch["record_index"][r, j])] = (lg, float(loss))
                rows_used += int(batch["num_examples"][r] > 0)
                most = max(most, int(batch["num_examples"][r]))
            if packing:  # positions restart at every packed example
                seg, pos = batch["segment_ids"], batch["position_ids"][0]
                starts = (seg > 0) & np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
                assert (pos[starts] == 0).all()
        return out, rows_used, most

    plain, rows_plain, _ = per_example(False)
    packed, rows_packed, most = per_example(True)
    assert sorted(plain) == sorted(packed) == list(range(len(SIZES)))
    assert most >= 2 and rows_packed < rows_plain  # it really packed
    for i in plain:
        np.testing.assert_allclose(packed[i][0], plain[i][0], atol=2e-5)
        assert packed[i][1] == pytest.approx(plain[i][1], abs=1e-5)


@pytest.mark.slow  # ~21 s on 2 cores
def test_tiny_internvl_trains_exports_and_scores_as_evaluated(tmp_path):
    """configs/internvl_tiny.py (embedded puzzles) trains a few steps through ``jaxprm.train.train`` on a
    (data=2, fsdp=2, tensor=2) mesh; the export and the workdir load with ``load_prm`` on the InternVL
    backbone with the visualprm style, score alike, and the in-training eval equals ``PRM.score_batch``
    on the export."""
    import jaxprm
    from jaxprm.eval import step_f1 as f1_lib
    from jaxprm.train import train

    c = _config(tmp_path / "w", max_steps=3)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    m = train(c)
    assert m["step"] == 3 and m["skipped_records"] == 0 and np.isfinite(m["train/loss"])
    spec = json.load(open(os.path.join(c.workdir, "export", "prm.json")))
    assert spec["prompt_style"] == "visualprm" and spec["system_prompt"] == c.model.system_prompt
    assert json.load(open(os.path.join(c.workdir, "export", "config.json")))["model_type"] == "internvl"
    prm = jaxprm.load_prm(os.path.join(c.workdir, "export"))
    assert prm.model.backbone_kind == "internvl" and prm.prompt_style.name == "visualprm"
    recs = list(read_records(os.path.join(c.workdir, "data"), "validation"))
    items = [(r.images[0], r.question, [s.text for s in r.steps]) for r in recs]
    scores = prm.score_batch(items)
    api = f1_lib.step_f1(recs, scores=scores)["overall"]
    assert m["eval/steps"] == api["n_steps"] == sum(len(r.steps) for r in recs)
    assert m["eval/acc"] == pytest.approx(api["accuracy"], abs=1e-9)
    assert m["eval/macro_f1"] == pytest.approx(api["macro_f1"], abs=1e-9)
    from_workdir = jaxprm.load_prm(c.workdir).score_batch(items[:2])
    for a, b in zip(from_workdir, scores[:2]):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_training_from_an_internvl_directory(rows, tmp_path):
    """``model.init="hf"`` on an InternVL directory (transformers' native layout, as a tiny random PRM
    exports it), VisualPRM400K rows: the backbone and the visualprm style are read from the directory,
    the weights start as the directory's, and it trains and exports."""
    from jaxprm.models.internvl import from_pretrained
    from jaxprm.train import model_assets, train

    src = tmp_path / "src"
    c0 = _config(tmp_path / "w0", *rows)
    cfg, tok, ip = model_assets(c0)
    model = PRMModel(InternVL(cfg, rngs=nnx.Rngs(3)), ckpt.default_spec(tok, prompt_style="visualprm"))
    ckpt.export_hf(model, tok, ip, str(src))

    c = _config(tmp_path / "w", *rows, max_steps=2, save_every=1)
    c.model.init, c.model.hf_dir, c.model.preset = "hf", str(src), ""
    c.optim.lr = 1e-9  # the weights barely move: they must be the directory's
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2  # read whole, then placed sharded
    c2, tok2, ip2 = model_assets(c)
    assert c2 == cfg and ip2.to_config() == ip.to_config() and len(tok2) == len(tok)
    m = train(c)
    assert m["step"] == 2 and m["skipped_records"] == 0
    got = nnx.to_pure_dict(nnx.state(ckpt.load_prm_model(c.workdir)[0].backbone, nnx.Param))
    want = nnx.to_pure_dict(nnx.state(from_pretrained(str(src)), nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert json.load(open(os.path.join(c.workdir, "export", "prm.json")))["prompt_style"] == "visualprm"


def test_internvl3_8b_config_only_misses_user_paths():
    from configs import internvl3_8b
    from jaxprm.train import ConfigError, validate_config

    c = internvl3_8b.get_config()
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 2 and "model.hf_dir" in problems[0] and "data.records" in problems[1], problems
