"""The KV-cache sampler: logits filters, cached decoding == full re-forward, parity with transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxprm.data import synthetic as syn
from jaxprm.models.qwen2_5_vl import from_pretrained, rope
from jaxprm.search.sampler import Sampler, apply_top_k, apply_top_p, sample_logits

from ..models.hf_reference import build_hf_model

NEG = -1e29


# ------------------------------------------------------------------------------------------------
# filters on fixed logits
# ------------------------------------------------------------------------------------------------
def test_top_k_keeps_the_k_largest():
    x = jnp.asarray([[1.0, 3.0, 2.0, 0.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = np.asarray(apply_top_k(x, 2)) > NEG
    np.testing.assert_array_equal(kept, [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(apply_top_k(x, 0)), np.asarray(x))  # disabled
    np.testing.assert_array_equal(np.asarray(apply_top_k(x, 5)), np.asarray(x))
    ties = np.asarray(apply_top_k(jnp.asarray([[1.0, 3.0, 3.0, 0.0]]), 1)) > NEG
    np.testing.assert_array_equal(ties, [[0, 1, 1, 0]])  # ties with the k-th are kept


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.asarray([0.05, 0.5, 0.15, 0.3])
    x = jnp.asarray(np.log(probs))[None]

    def kept(p):
        return (np.asarray(apply_top_p(x, p))[0] > NEG).astype(int).tolist()

    assert kept(0.3) == [0, 1, 0, 0]  # the top token alone already has mass >= p
    assert kept(0.5) == [0, 1, 0, 0]
    assert kept(0.51) == [0, 1, 0, 1]
    assert kept(0.79) == [0, 1, 0, 1]
    assert kept(0.81) == [0, 1, 1, 1]
    assert kept(0.96) == [1, 1, 1, 1]
    assert kept(1.0) == [1, 1, 1, 1]
    # kept logits are unchanged
    np.testing.assert_allclose(np.asarray(apply_top_p(x, 0.81))[0, [1, 2, 3]], np.log(probs[[1, 2, 3]]), rtol=1e-6)


def test_sample_logits_greedy_and_distribution():
    probs = np.asarray([0.05, 0.5, 0.15, 0.3], np.float32)
    logits = jnp.asarray(np.log(probs))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)

    @jax.jit
    def draws(keys, temperature, top_p):
        return (jax.vmap(lambda k: sample_logits(k, logits, temperature, top_k=3, top_p=top_p))(keys),
                jax.vmap(lambda k: sample_logits(k, logits, temperature, top_k=0, top_p=top_p))(keys))

    greedy3, greedy = (np.asarray(x) for x in draws(keys, 0.0, 1.0))
    assert (greedy3 == 1).all() and (greedy == 1).all()  # temperature 0: argmax
    d3, _ = (np.asarray(x) for x in draws(keys, 1.0, 0.7))
    # top-k 3 drops token 0; nucleus 0.7 over the rest keeps tokens 1 and 3 (0.5/0.95 + 0.3/0.95 >= 0.7)
    assert set(np.unique(d3).tolist()) == {1, 3}
    assert abs(np.mean(d3 == 1) - 0.5 / 0.8) < 0.03
    _, hot = (np.asarray(x) for x in draws(keys, 2.0, 1.0))
    assert abs(np.mean(hot == 0) - np.sqrt(0.05) / np.sqrt(probs).sum()) < 0.03  # temperature flattens


# ------------------------------------------------------------------------------------------------
# a tiny random HF checkpoint with the synthetic tokenizer, loaded into the Flax model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = syn.build_synthetic_tokenizer()
    cfg = syn.tiny_model_config(tok)
    hf = build_hf_model(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict()), seed=3)
    d = str(tmp_path_factory.mktemp("tiny_policy"))
    hf.save_pretrained(d)
    model = from_pretrained(d)
    sampler = Sampler(model, tok, max_len=512, decode_chunk=4)
    rec = syn.generate_records(1, seed=5, image_size=(56, 84))[0]
    return {"tok": tok, "cfg": cfg, "hf": hf, "model": model, "sampler": sampler, "rec": rec}


def _full_forward_greedy(model, sampler, enc, steps):
    """Reference: re-run the whole sequence every step, no cache (right-padded to one fixed length
    with padding segment 0, so one compile serves every step)."""
    cfg = model.config
    v = cfg.vision
    grid = enc["image_grid_thw"]
    pv = jnp.asarray(enc["pixel_values"])
    layout = rope.vision_layout(grid, merge=v.spatial_merge_size, window_size=v.window_size,
                                patch_size=v.patch_size).as_dict()
    fwd = nnx.jit(lambda m, ids, pos, seg: m.logits(m.hidden_states(ids, pos, seg, pv, layout)))
    ids = list(enc["input_ids"])
    total = len(ids) + steps
    toks, logits = [], []
    for _ in range(steps):
        n = len(ids)
        a = np.zeros((1, total), np.int32)
        a[0, :n] = ids
        pos = np.zeros((3, 1, total), np.int32)
        pos[:, :, :n] = rope.get_rope_index(a[:, :n], image_token_id=cfg.image_token_id,
                                            spatial_merge_size=v.spatial_merge_size, image_grid_thw=grid)[0]
        seg = (np.arange(total) < n).astype(np.int32)[None]
        lg = np.array(fwd(model, jnp.asarray(a), jnp.asarray(pos), jnp.asarray(seg))[0, n - 1])
        lg[sampler.vocab_limit:] = -np.inf
        t = int(np.argmax(lg))
        toks.append(t)
        logits.append(lg)
        ids.append(t)
    return toks, np.stack(logits)


def test_cached_greedy_equals_full_forward(tiny):
    s, rec = tiny["sampler"], tiny["rec"]
    # 10 new tokens with chunks of 4: the last chunk is partly discarded
    gens = s.generate_full(rec.images[0], rec.question, n=2, temperature=0.0, max_new_tokens=10, return_logits=True)
    assert [g.finish_reason for g in gens] == ["length", "length"]
    assert gens[0].token_ids == gens[1].token_ids and len(gens[0].token_ids) == 10
    enc = s.encode_prompt(rec.images[0], rec.question)
    ref_toks, ref_logits = _full_forward_greedy(tiny["model"], s, enc, 10)
    assert gens[0].token_ids == ref_toks
    lim = s.vocab_limit
    np.testing.assert_allclose(gens[0].logits[:, :lim], ref_logits[:, :lim], atol=2e-5, rtol=1e-5)
    assert len(set(ref_toks)) > 1  # a non-degenerate sequence


def test_prompt_and_generation_match_transformers(tiny):
    s, rec, hf, cfg = tiny["sampler"], tiny["rec"], tiny["hf"], tiny["cfg"]
    prefix = "[Visual Elements]\n"
    enc = s.encode_prompt(rec.images[0], rec.question, assistant_prefix=prefix)
    # the prompt is what transformers' processor would build: chat template + expanded image pads
    text = tiny["tok"].apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec.question}]}],
        tokenize=False, add_generation_prompt=True) + prefix
    n_img = int(np.prod(enc["image_grid_thw"][0]) // 4)
    expect = tiny["tok"](text.replace("<|image_pad|>", "<|image_pad|>" * n_img), add_special_tokens=False)["input_ids"]
    assert enc["input_ids"].tolist() == expect

    gen = s.generate_full(rec.images[0], rec.question, n=2, assistant_prefix=prefix, temperature=0.0,
                          max_new_tokens=8, return_logits=True)[0]
    ids = torch.tensor(enc["input_ids"][None].astype(np.int64))
    pv, grid = torch.tensor(enc["pixel_values"]), torch.tensor(enc["image_grid_thw"])
    suppress = list(range(s.vocab_limit, cfg.text.vocab_size))  # our sampler never draws padded vocab ids
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                          mm_token_type_ids=(ids == cfg.image_token_id).int(), do_sample=False, max_new_tokens=8,
                          suppress_tokens=suppress, eos_token_id=None, pad_token_id=0)
        hf_toks = out[0, ids.shape[1]:].tolist()
        assert hf_toks[: len(gen.token_ids)] == gen.token_ids
        if gen.finish_reason == "eos":  # we drop the end-of-turn token from the output; transformers went on
            assert hf_toks[len(gen.token_ids)] in s.stop_token_ids
        else:
            assert len(gen.token_ids) == 8
        full = torch.tensor(np.concatenate([enc["input_ids"], gen.token_ids[:-1]])[None].astype(np.int64))
        ref = hf(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=pv, image_grid_thw=grid,
                 mm_token_type_ids=(full == cfg.image_token_id).int()).logits[0, ids.shape[1] - 1:].numpy()
    lim = s.vocab_limit
    # first step (prefill) and every cached decode step against transformers' full forward
    np.testing.assert_allclose(gen.logits[:, :lim], ref[:, :lim], atol=1e-4)


def test_sampling_seeded_top_k_and_rows_independent(tiny):
    s, rec = tiny["sampler"], tiny["rec"]
    kw = dict(n=2, temperature=1.5, top_k=5, max_new_tokens=10, return_logits=True)
    a = s.generate_full(rec.images[0], rec.question, seed=1, **kw)
    b = s.generate_full(rec.images[0], rec.question, seed=1, **kw)
    c = s.generate_full(rec.images[0], rec.question, seed=2, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert a[0].token_ids != a[1].token_ids  # each row draws its own tokens
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    for g in a + c:
        assert all(t < s.vocab_limit for t in g.token_ids)
        # every drawn token is among the 5 most likely of its step
        top5 = np.argsort(-g.logits, axis=-1)[:, :5]
        assert all(t in top5[i] for i, t in enumerate(g.token_ids))


def test_stop_strings_and_stop_tokens(tiny):
    s, tok = tiny["sampler"], tiny["tok"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    body = tok.encode("There are 2 red circles.\n\nAdding up", add_special_tokens=False)
    tokens, done, texts = [list(body), list(body[:3]) + [im_end] + body[3:], list(body[:4])], [None] * 3, [""] * 3
    s._check(tokens, done, texts, ["\n\n"], max_new=100)
    assert done == ["stop", "eos", None]
    assert texts[0] == "There are 2 red circles."
    assert texts[1] == tok.decode(body[:3]) and tokens[1] == body[:3]
    assert "\n\n" in tok.decode(tokens[0]) and "\n\n" not in tok.decode(tokens[0][:-1])
    tokens2, done2, texts2 = [list(body[:4])], [None], [""]
    s._check(tokens2, done2, texts2, [], max_new=4)
    assert done2 == ["length"] and texts2[0] == tok.decode(body[:4])


def test_rejects_bad_arguments(tiny):
    s, rec = tiny["sampler"], tiny["rec"]
    with pytest.raises(ValueError, match="top_p"):
        s.generate(rec.images[0], rec.question, top_p=0.0)
    with pytest.raises(ValueError, match="max_len"):
        s.generate(rec.images[0], "word " * 600)
