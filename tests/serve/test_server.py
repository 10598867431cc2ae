"""``python -m jaxprm.serve`` as a real uvicorn process on a free localhost port, and ``RemotePRM``
against it: scores equal the in-process PRM's for the same inputs (every endpoint: /v1/score in its
three forms, /v1/guide sessions, vLLM's /pooling in the chat and completion forms, /classify);
concurrent requests are gathered into batches (batch fill > 1) without recompiling; every bad input
gets its status code and message and the server keeps answering /health; best_of_n, guided search
and ``python -m jaxprm.eval vpb --prm http://...`` give the in-process results through RemotePRM;
SIGTERM drains (in-flight requests finish, new ones get 503, exit 0).

The PRM is the tiny random export of tests/test_load_errors.py (random weights suffice for parity).
"""
import base64
import concurrent.futures
import io
import json
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

import jaxprm
from jaxprm.data import synthetic as syn
from jaxprm.serve.metrics import parse_prometheus

from tests.serve.helpers import BUCKETS, bucket_args, call, start_server
from tests.test_load_errors import export  # noqa: F401 - the tiny random PRM export (a fixture)

KEY = "s3cret-key"
ATOL = 2e-5
LIMITS = ["--max-image-pixels", "40000", "--max-steps", "12", "--max-candidates", "6", "--max-items", "16",
          "--max-request-tokens", "6000", "--max-body-bytes", "300000", "--max-sessions", "2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "jax_compilation_cache"


@pytest.fixture(scope="module")
def server(export, tmp_path_factory, cache_dir):  # noqa: F811
    s = start_server(export[0], tmp_path_factory.mktemp("srv") / "server.log", *bucket_args(), *LIMITS,
                     "--max-wait-ms", "30", "--api-key", KEY, cache_dir=cache_dir)
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.log()[-2000:]


@pytest.fixture(scope="module")
def prm(export):  # noqa: F811
    return jaxprm.load_prm(export[0], **BUCKETS)


@pytest.fixture(scope="module")
def records():
    return syn.generate_records(12, seed=5)


def _b64(b):
    return base64.b64encode(bytes(b)).decode()


def _steps(r):
    return [s.text for s in r.steps]


def _post(server, path, body, **kw):
    return call(server.url, path, body, key=KEY, **kw)


def _metrics(server):
    status, text = call(server.url, "/metrics", key=KEY)
    assert status == 200
    return parse_prometheus(text)


def _scores(v):
    return np.asarray([np.nan if x is None else x for x in v], np.float64)


def _healthy(server):
    status, body = call(server.url, "/health")
    assert status == 200 and body["status"] == "ok", body
    assert server.proc.poll() is None


# ------------------------------------------------------------------------------------------------
# scores equal the in-process PRM's
# ------------------------------------------------------------------------------------------------
def test_score_forms_equal_in_process(server, prm, records):
    from jaxprm.search.aggregate import AGGREGATIONS, aggregate

    r = records[0]
    img, q, steps = r.images[0], r.question, _steps(r)
    ref = prm.score(img, q, steps)
    status, got = _post(server, "/v1/score", {"image": _b64(img), "question": q, "steps": steps})
    assert status == 200, got
    np.testing.assert_allclose(_scores(got["scores"]), ref, atol=ATOL, rtol=0)
    assert set(got["aggregates"]) == set(AGGREGATIONS) and got["truncated"] is False
    for name, v in got["aggregates"].items():
        assert v == pytest.approx(aggregate(ref, name), abs=1e-4), name
    # a data URL, and several images
    status, got = _post(server, "/v1/score", {"image": ["data:image/png;base64," + _b64(img), _b64(records[1].images[0])],
                                              "question": q, "steps": steps, "aggregations": ["min"]})
    assert status == 200 and list(got["aggregates"]) == ["min"], got
    np.testing.assert_allclose(_scores(got["scores"]), prm.score([img, records[1].images[0]], q, steps), atol=ATOL)

    cands = [steps, steps[:2], steps[:1] + ["2 + 2 = 5", "The answer is \\boxed{5}."]]
    status, got = _post(server, "/v1/score", {"image": _b64(img), "question": q, "candidates": cands})
    assert status == 200, got
    for c, want in zip(got["candidates"], prm.score_candidates(img, q, cands)):
        np.testing.assert_allclose(_scores(c["scores"]), want, atol=ATOL, rtol=0)
    means = [c["aggregates"]["mean"] for c in got["candidates"]]
    assert got["best_index"]["mean"] == int(np.argmax(means))

    items = [(x.images[0], x.question, _steps(x)) for x in records[:3]] + [(None, "Text only?", ["a", "b"])]
    body = {"items": [{"image": None if im is None else _b64(im), "question": qq, "steps": ss} for im, qq, ss in items]}
    status, got = _post(server, "/v1/score", body)
    assert status == 200, got
    for g, want in zip(got["items"], prm.score_batch(items)):
        np.testing.assert_allclose(_scores(g["scores"]), want, atol=ATOL, rtol=0)


def _chat(question, steps, image_b64):
    from jaxprm.data.prompt import first_turn_text

    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}}] if image_b64 else []
    msgs = [{"role": "user", "content": content + [{"type": "text", "text": first_turn_text(question, steps[0])}]}]
    for s in steps[1:]:
        msgs += [{"role": "assistant", "content": "+"}, {"role": "user", "content": s}]
    return msgs + [{"role": "assistant", "content": "+"}]


def test_vllm_pooling_and_classify_equal_in_process(server, prm, records):
    from jaxprm.data.prompt import build_messages

    r = records[2]
    img, q, steps = r.images[0], r.question, _steps(r)
    ref = prm.score(img, q, steps)
    status, got = _post(server, "/pooling", {"model": "prm", "task": "token_classify", "messages": _chat(q, steps, _b64(img))})
    assert status == 200, got
    assert got["object"] == "list" and got["id"].startswith("pool-") and got["model"] == "prm"
    assert set(got["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens"}
    (d,) = got["data"]
    assert d["index"] == 0 and d["object"] == "pooling" and len(d["data"]) == len(steps)
    rows = np.asarray(d["data"])  # one [P(+), P(-)] row per step
    np.testing.assert_allclose(rows[:, 0], ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(rows.sum(1), 1.0, atol=1e-6)
    # the question in a turn of its own, the system prompt given (it must be the PRM's own)
    msgs = [{"role": "system", "content": prm.system_prompt},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(img)}},
                                         {"type": "text", "text": q}]}] + [{"role": "user", "content": s} for s in steps]
    status, got2 = _post(server, "/pooling", {"messages": msgs})
    assert status == 200, got2
    # completion form: the text-only prompt as the chat template renders it (a list of two prompts)
    tok = prm.tokenizer
    text = tok.apply_chat_template(build_messages(q, steps, num_images=0, system_prompt=prm.system_prompt), tokenize=False)
    status, got = _post(server, "/pooling", {"input": [text, text]})
    assert status == 200, got
    ref_text = prm.score(None, q, steps)
    assert [d["index"] for d in got["data"]] == [0, 1]
    for d in got["data"]:
        np.testing.assert_allclose(np.asarray(d["data"])[:, 0], ref_text, atol=ATOL, rtol=0)
    # token ids in, same answer
    status, got_ids = _post(server, "/pooling", {"input": tok(text, add_special_tokens=False)["input_ids"]})
    assert status == 200, got_ids
    np.testing.assert_allclose(np.asarray(got_ids["data"][0]["data"])[:, 0], ref_text, atol=ATOL, rtol=0)

    status, got = _post(server, "/classify", {"model": "prm", "messages": _chat(q, steps, _b64(img))})
    assert status == 200, got
    (c,) = got["data"]
    assert c["num_classes"] == 2 and c["probs"][0] == pytest.approx(float(ref[-1]), abs=ATOL)
    assert c["label"] == ("+" if ref[-1] >= 0.5 else "-") and got["id"].startswith("classify-")


def test_guide_sessions_equal_in_process(server, prm, records):
    r = records[3]
    img, q, steps = r.images[0], r.question, _steps(r)
    inc = prm.incremental_scorer(img, q)
    sid = "search-1"
    for k in range(len(steps)):
        cands = [steps[k], steps[k] + " Wait, no.", "So the answer is \\boxed{0}."]
        body = {"session_id": sid, "steps": steps[:k], "candidates": cands}
        if k == 0:
            body.update(image=_b64(img), question=q)
        status, got = _post(server, "/v1/guide", body)
        assert status == 200, got
        assert got["session_id"] == sid and got["session"] == ("new" if k == 0 else "reused")
        for g, want in zip(got["scores"], inc.score_next(steps[:k], cands)):
            np.testing.assert_allclose(_scores(g), want, atol=ATOL, rtol=0)
        assert got["aggregate"] == "last" and got["best_index"] == int(np.argmax(got["aggregated"]))
    assert got["cached_tokens"] > 0
    # the LRU keeps 2 sessions: two more evict this one, whose next call without the image is a 404
    for other in ("search-2", "search-3"):
        assert _post(server, "/v1/guide", {"session_id": other, "image": _b64(img), "question": q,
                                           "candidates": ["x"]})[0] == 200
    status, got = _post(server, "/v1/guide", {"session_id": sid, "steps": steps[:1], "candidates": ["y"]})
    assert status == 404 and "unknown or expired session" in got["error"]["message"], got
    assert _post(server, "/v1/guide/search-3", None, method="DELETE")[0] == 200
    assert _post(server, "/v1/guide/search-3", None, method="DELETE")[0] == 404


# ------------------------------------------------------------------------------------------------
# dynamic batching, no recompilation
# ------------------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_without_recompiling(server, prm, records):
    before = _metrics(server)
    n = 12
    barrier = threading.Barrier(n)

    def one(i):
        r = records[i % len(records)]
        barrier.wait()
        return _post(server, "/v1/score", {"image": _b64(r.images[0]), "question": r.question, "steps": _steps(r)})

    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        results = list(ex.map(one, range(n)))
    refs = prm.score_batch([(r.images[0], r.question, _steps(r)) for r in records])
    for i, (status, got) in enumerate(results):
        assert status == 200, got
        np.testing.assert_allclose(_scores(got["scores"]), refs[i % len(records)], atol=ATOL, rtol=0)
    after = _metrics(server)
    k = (("kind", "items"),)
    batches = after[("jaxprm_batches_total", k)] - before.get(("jaxprm_batches_total", k), 0)
    items = after[("jaxprm_batch_items_total", k)] - before.get(("jaxprm_batch_items_total", k), 0)
    assert items == n and items / batches > 1, (items, batches)  # batch fill > 1
    # no compilation: every shape was compiled at warm-up (only the two-image request of the first test,
    # 128 patches, is over the largest patch bucket and compiled once)
    assert after[("jaxprm_compilations", ())] == before[("jaxprm_compilations", ())] > 0
    lat = ("jaxprm_request_latency_seconds_count", (("endpoint", "/v1/score"),))
    assert after[lat] - before.get(lat, 0) == n
    assert after[("jaxprm_requests_total", (("endpoint", "/v1/score"), ("status", "200")))] >= n


# ------------------------------------------------------------------------------------------------
# bad input: a clear 4xx each, and the server stays up
# ------------------------------------------------------------------------------------------------
def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return _b64(buf.getvalue())


def _bad_cases(records, prm):
    r = records[0]
    img, q, steps = _b64(r.images[0]), r.question, _steps(r)
    ok = {"image": img, "question": q, "steps": steps}
    ids_text = prm.tokenizer.apply_chat_template(
        __import__("jaxprm.data.prompt", fromlist=["x"]).build_messages(q, steps, num_images=1,
                                                                        system_prompt=prm.system_prompt), tokenize=False)
    return [  # (name, path, body or raw bytes, status, words in the message)
        ("malformed json", "/v1/score", b'{"question": "q", "steps": [', 400, "malformed JSON"),
        ("empty body", "/v1/score", b"", 400, "empty request body"),
        ("not an object", "/v1/score", [1, 2], 422, "must be a JSON object"),
        ("missing question", "/v1/score", {"image": img, "steps": steps}, 422, "missing field 'question'"),
        ("missing steps", "/v1/score", {"image": img, "question": q}, 422, "exactly one of 'steps'"),
        ("steps not a list", "/v1/score", {**ok, "steps": "one step"}, 422, "steps must be a list of strings"),
        ("empty steps", "/v1/score", {**ok, "steps": []}, 422, "steps must not be empty"),
        ("step not a string", "/v1/score", {**ok, "steps": ["a", 3]}, 422, "steps[1] must be a string"),
        ("not base64", "/v1/score", {**ok, "image": "%%%not-base64%%%"}, 400, "not valid base64"),
        ("undecodable image", "/v1/score", {**ok, "image": _b64(b"GIF89a this is not an image")}, 400,
         "could not decode the image"),
        ("image URL", "/v1/score", {**ok, "image": "https://example.com/x.png"}, 422, "not fetched"),
        ("image over the pixel limit", "/v1/score", {**ok, "image": _png(250, 250)}, 413,
         "62500 pixels is over the limit of 40000"),
        ("too many images", "/v1/score", {**ok, "image": [img] * 9}, 413, "9 images, over the limit of 8"),
        ("too many steps", "/v1/score", {**ok, "steps": ["s"] * 13}, 413, "13 steps, over the limit of 12"),
        ("too many candidates", "/v1/score", {"image": img, "question": q, "candidates": [steps] * 7}, 413,
         "7 solutions, over the limit of 6"),
        ("too many items", "/v1/score", {"items": [ok] * 17}, 413, "17 entries, over the limit of 16"),
        ("token budget", "/v1/score", {"items": [{**ok, "question": q + " 7" * 400}] * 16}, 413, "over the limit of 6000"),
        ("too long for max_length", "/v1/score", {**ok, "question": "1 2 " * 400}, 413, "too long to score"),
        ("unknown aggregation", "/v1/score", {**ok, "aggregations": ["median"]}, 422, "unknown aggregation 'median'"),
        ("guide unknown aggregation", "/v1/guide", {"image": img, "question": q, "candidates": ["a"], "aggregate": "x"},
         422, "unknown aggregation 'x'"),
        ("guide unknown session", "/v1/guide", {"session_id": "nope", "candidates": ["a"]}, 404, "unknown or expired"),
        ("guide without candidates", "/v1/guide", {"image": img, "question": q}, 422, "missing field 'candidates'"),
        ("body over the limit", "/v1/score", {**ok, "question": "x" * 310000}, 413, "over the limit of 300000 bytes"),
        ("pooling unknown task", "/pooling", {"task": "embed", "messages": _chat(q, steps, img)}, 422,
         "task 'embed' is not supported"),
        ("pooling base64 output", "/pooling", {"encoding_format": "base64", "messages": _chat(q, steps, img)}, 422,
         "encoding_format='base64' is not supported"),
        ("pooling image in completion form", "/pooling", {"input": ids_text}, 422, "completion form carries no image"),
        ("pooling not ChatML", "/pooling", {"input": "just some text"}, 422, "rendered with its chat template"),
        ("pooling no steps", "/pooling", {"messages": [{"role": "user", "content": "q only"}]}, 422, "no steps"),
        ("pooling foreign system prompt", "/pooling",
         {"messages": [{"role": "system", "content": "You are helpful."}] + _chat(q, steps, img)}, 422,
         "differs from the PRM's system prompt"),
        ("pooling image part without data", "/pooling",
         {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                       {"role": "user", "content": "s"}]}, 422, "needs its data"),
        ("classify both forms", "/classify", {"input": "x", "messages": []}, 422, "exactly one of 'input'"),
        ("pooling token id out of vocabulary", "/pooling", {"input": [1, 10 ** 9]}, 422, "outside the vocabulary"),
        ("unknown route", "/v1/nothing", {}, 404, "no route"),
    ]


def test_bad_inputs_get_a_clear_4xx_and_the_server_stays_up(server, prm, records):
    compiles = _metrics(server)[("jaxprm_compilations", ())]
    failures = []
    for name, path, body, status, words in _bad_cases(records, prm):
        raw = body if isinstance(body, bytes) else None
        got_status, got = _post(server, path, None if raw is not None else body, raw=raw)
        msg = got["error"]["message"] if isinstance(got, dict) and "error" in got else str(got)
        if got_status != status or words not in msg:
            failures.append(f"{name}: got {got_status} {msg!r}, want {status} with {words!r}")
        elif isinstance(got, dict):
            assert got["error"]["code"] == status and got["error"]["type"], got
        _healthy(server)
    assert not failures, "\n".join(failures)
    # the API key: missing or wrong -> 401 (compared in constant time); /health needs none
    assert call(server.url, "/v1/models")[0] == 401
    status, got = call(server.url, "/v1/score", {"question": "q", "steps": ["a"]}, key="wrong")
    assert status == 401 and "API key" in got["error"]["message"]
    assert call(server.url, "/v1/models", headers={"X-API-Key": KEY})[0] == 200
    _healthy(server)
    assert _metrics(server)[("jaxprm_compilations", ())] == compiles


# ------------------------------------------------------------------------------------------------
# RemotePRM: the PRM interface over HTTP; search and eval run unchanged
# ------------------------------------------------------------------------------------------------
def test_remote_prm_equals_in_process_and_drives_search(server, prm, records, tmp_path):
    from jaxprm.scoring import RemotePRM
    from jaxprm.scoring.remote import RemoteInputError, RemotePRMError
    from jaxprm.search import ScriptedPolicy, best_of_n, guided_greedy_search

    remote = RemotePRM(server.url, api_key=KEY)
    assert remote.spec.plus_id == prm.spec.plus_id and remote.max_length == prm.max_length
    r = records[4]
    img, q, steps = r.images[0], r.question, _steps(r)
    arr = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"))
    p = tmp_path / "x.png"
    p.write_bytes(img)
    for image in (img, arr, Image.open(io.BytesIO(img)), str(p), [img, arr], None):
        np.testing.assert_allclose(remote.score(image, q, steps), prm.score(image, q, steps), atol=ATOL, rtol=0)
    items = [(x.images[0], x.question, _steps(x)) for x in records] * 2  # 24 > max_items: two requests
    for g, w in zip(remote.score_batch(items), prm.score_batch(items)):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)
    with pytest.raises(TypeError, match="steps must be a list"):
        remote.score(img, q, "a step")
    with pytest.raises(RemoteInputError, match="over the limit of 12") as e:
        remote.score(img, q, ["s"] * 13)
    assert isinstance(e.value, ValueError) and e.value.status == 413
    with pytest.raises(RemotePRMError, match="HTTP 401"):
        RemotePRM(server.url, api_key="wrong").score(img, q, steps)

    policy = ScriptedPolicy(records, solution_error_rate=0.5, step_error_rate=0.3, seed=0)
    cands = policy.sample_solutions(img, q, n=6)
    a, b = best_of_n(remote, img, q, cands, aggregate="min"), best_of_n(prm, img, q, cands, aggregate="min")
    assert a.best_index == b.best_index
    np.testing.assert_allclose(a.aggregated, b.aggregated, atol=1e-4)
    ga = guided_greedy_search(remote, ScriptedPolicy(records, step_error_rate=0.3, seed=1), img, q, k=4)
    gb = guided_greedy_search(prm, ScriptedPolicy(records, step_error_rate=0.3, seed=1), img, q, k=4)
    assert ga.steps == gb.steps and ga.answer == gb.answer
    np.testing.assert_allclose(ga.step_scores, gb.step_scores, atol=1e-4)


def test_eval_cli_scores_through_a_server(server, prm, records, tmp_path, monkeypatch):
    from jaxprm.eval.run import main

    (tmp_path / "img").mkdir()
    rows = []
    for i, r in enumerate(records[:5]):
        (tmp_path / "img" / f"{i}.png").write_bytes(r.images[0])
        rows.append({"image": [f"img/{i}.png"], "question": r.question, "data_source": "synthetic",
                     "response": {"steps": _steps(r), "process_correctness": [1 if s.label else -1 for s in r.steps]}})
    data = tmp_path / "vpb.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    monkeypatch.setenv("JAXPRM_API_KEY", KEY)
    common = ["vpb", "--data", str(data), "--no-progress", "--batch-size", "4"]
    assert main(common + ["--prm", server.url, "--out", str(tmp_path / "remote")]) == 0
    assert main(common + ["--prm", "local", "--out", str(tmp_path / "local")], prm=prm) == 0
    read = lambda d: [json.loads(x)["pred_scores"] for x in (tmp_path / d / "vpb_scores.jsonl").read_text().splitlines()]
    for a, b in zip(read("remote"), read("local"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# SIGTERM: in-flight requests finish, new ones get 503, the process exits 0
# ------------------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests(export, tmp_path, cache_dir, records):  # noqa: F811
    s = start_server(export[0], tmp_path / "server.log", *bucket_args(), "--warmup", "full", cache_dir=cache_dir)
    try:
        items = [{"image": _b64(r.images[0]), "question": r.question, "steps": _steps(r)} for r in records]
        n = 4
        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            futs = [ex.submit(call, s.url, "/v1/score", {"items": items}) for _ in range(n)]
            deadline = time.time() + 30
            while time.time() < deadline:  # wait until all four are in flight
                st, text = call(s.url, "/metrics")
                if parse_prometheus(text).get(("jaxprm_inflight_requests", ()), 0) >= n + 1:
                    break
                time.sleep(0.05)
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            status, got = call(s.url, "/v1/score", {"items": items[:1]})
            assert status == 503 and "shutting down" in got["error"]["message"], got
            assert call(s.url, "/health") == (503, {"status": "draining"})
            done = [f.result(timeout=120) for f in futs]
        assert [st for st, _ in done] == [200] * n, [str(g)[:200] for _, g in done]
        assert all(len(g["items"]) == len(items) for _, g in done)
        assert s.proc.wait(60) == 0
        assert "draining" in s.log()
    finally:
        s.stop()
