"""Request validation for the scoring server: every bad input becomes a ``RequestError`` with an HTTP
status and a message naming the field, before anything reaches the scorer.

Status codes (see docs/serving.md):

* 400 ``invalid_request``: the body is not JSON, an image is not base64 / not a data URL / cannot be
  decoded;
* 413 ``too_large``: body over ``max_body_bytes``, an image over ``max_image_pixels``, more steps /
  candidates / items / images than allowed, a request over ``max_request_tokens``, or a solution whose
  prompt and first step do not fit the PRM's ``max_length``;
* 422 ``invalid_field``: a missing field, a wrong type, an unknown aggregation or task, an unsupported
  vLLM option.

Images are decoded here (never fetched: only base64 or ``data:`` URLs), their pixel count checked from
the header before the pixels are decoded, and turned into ``(H, W, 3)`` uint8 arrays exactly as
``PRM.score`` turns encoded bytes into pixels (``jaxprm.data.preprocess.to_rgb_array``), so the server
scores what the in-process PRM scores.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import re
from typing import Any

import numpy as np

__all__ = ["RequestError", "Limits", "Item", "decode_images", "parse_score", "parse_guide", "parse_pooling",
           "chat_to_item", "parse_chatml"]


class RequestError(Exception):
    """A client error: HTTP ``status``, a message, an error ``type`` and the offending ``param``."""

    TYPES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
             422: "invalid_field", 503: "unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = int(status), message, param
        self.type = type or self.TYPES.get(self.status, "error")

    def body(self) -> dict:
        """vLLM's / OpenAI's error schema: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold (CLI flags of ``python -m jaxprm.serve``)."""

    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # per solution
    max_steps: int = 64  # per solution
    max_candidates: int = 64  # per problem (/v1/score candidates, /v1/guide)
    max_items: int = 64  # solutions per request (/v1/score items, /pooling and /classify inputs)
    max_step_chars: int = 20000  # per step and per question
    max_request_tokens: int = 131072  # question + steps + image tokens over the whole request


@dataclasses.dataclass
class Item:
    """One solution to score: decoded images (uint8 arrays, or None), the question and the steps."""

    images: list[np.ndarray] | None
    question: str
    steps: list[str]
    image_key: str = ""  # digest of the encoded images and the question (guide sessions)


# ------------------------------------------------------------------------------------------------
# fields
# ------------------------------------------------------------------------------------------------
def _require(body: dict, name: str, where: str = "") -> Any:
    if name not in body:
        raise RequestError(422, f"missing field {where + name!r}", where + name)
    return body[name]


def _string(v, field: str, limits: Limits, *, allow_empty: bool = True) -> str:
    if not isinstance(v, str):
        raise RequestError(422, f"{field} must be a string, got {_tname(v)}", field)
    if not allow_empty and not v.strip():
        raise RequestError(422, f"{field} must not be empty", field)
    _at_most(len(v), limits.max_step_chars, field, "characters")
    return v


def _at_most(n: int, limit: int, field: str, unit: str) -> None:
    """413 when ``field`` has ``n`` ``unit`` (steps, characters, ...), more than ``limit``."""
    if n > limit:
        raise RequestError(413, f"{field} has {n} {unit}, over the limit of {limit}", field)


def _candidates(v, limits: Limits, what: str, unit: str) -> list:
    """``candidates``: a non-empty list of ``what``, at most ``limits.max_candidates`` ``unit``."""
    if not isinstance(v, list) or not v:
        raise RequestError(422, f"candidates must be a non-empty list of {what}", "candidates")
    _at_most(len(v), limits.max_candidates, "candidates", unit)
    return v


def _tname(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _steps(v, field: str, limits: Limits, *, allow_empty: bool = False) -> list[str]:
    if not isinstance(v, list):
        raise RequestError(422, f"{field} must be a list of strings, got {_tname(v)}", field)
    if not v and not allow_empty:
        raise RequestError(422, f"{field} must not be empty (a solution has at least one step)", field)
    _at_most(len(v), limits.max_steps, field, "steps")
    return [_string(s, f"{field}[{i}]", limits) for i, s in enumerate(v)]


def _object(body, field: str = "body") -> dict:
    if not isinstance(body, dict):
        raise RequestError(422, f"the {field} must be a JSON object, got {_tname(body)}", None if field == "body" else field)
    return body


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[\w.+-]+)*;base64,", re.I)


def _b64(s: str, field: str) -> bytes:
    if s.startswith("data:"):
        m = _DATA_URL.match(s[:200])
        if not m:
            raise RequestError(400, f"{field}: a data URL must look like 'data:image/png;base64,...'", field)
        s = s[m.end():]
    elif "://" in s[:16]:
        raise RequestError(422, f"{field}: image URLs are not fetched; send the image as base64 or a data URL", field)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{field}: not valid base64 image data", field) from None


def decode_image(s, field: str, limits: Limits) -> tuple[np.ndarray, bytes]:
    """(H, W, 3) uint8 array and the encoded bytes of one base64 / data-URL image."""
    from PIL import Image

    from jaxprm.data.preprocess import to_rgb_array

    if not isinstance(s, str):
        raise RequestError(422, f"{field} must be a base64 string or a data URL, got {_tname(s)}", field)
    raw = _b64(s, field)
    if not raw:
        raise RequestError(400, f"{field}: empty image data", field)
    try:
        im = Image.open(io.BytesIO(raw))
        w, h = im.size
    except Exception as e:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise RequestError(400, f"{field}: could not decode the image ({len(raw)} bytes): {e}", field) from None
    if w * h > limits.max_image_pixels:
        raise RequestError(413, f"{field}: image of {w}x{h} = {w * h} pixels is over the limit of "
                                f"{limits.max_image_pixels} pixels", field)
    try:
        im.load()
        arr = to_rgb_array(im)
    except Exception as e:  # noqa: BLE001
        raise RequestError(400, f"{field}: could not decode the image ({len(raw)} bytes): {e}", field) from None
    return arr, raw


def decode_images(v, field: str, limits: Limits) -> tuple[list[np.ndarray] | None, str]:
    """``image``: null, one base64 string / data URL, or a list of them -> (arrays or None, digest)."""
    if v is None:
        return None, hashlib.sha256(b"").hexdigest()
    items = v if isinstance(v, list) else [v]
    _at_most(len(items), limits.max_images, field, "images")
    arrays, digest = [], hashlib.sha256()
    for i, s in enumerate(items):
        arr, raw = decode_image(s, f"{field}[{i}]" if isinstance(v, list) else field, limits)
        arrays.append(arr)
        digest.update(hashlib.sha256(raw).digest())
    return (arrays or None), digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# /v1/score and /v1/guide
# ------------------------------------------------------------------------------------------------
def _item(body: dict, limits: Limits, where: str = "") -> Item:
    q = _string(_require(body, "question", where), where + "question", limits)
    steps = _steps(_require(body, "steps", where), where + "steps", limits)
    images, key = decode_images(body.get("image"), where + "image", limits)
    return Item(images, q, steps, _key(key, q))


def _key(image_digest: str, question: str) -> str:
    return hashlib.sha256(image_digest.encode() + b"\0" + question.encode("utf-8", "surrogatepass")).hexdigest()


def _aggregations(body: dict, choices) -> list[str]:
    v = body.get("aggregations")
    if v is None:
        return list(choices)
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
        raise RequestError(422, f"aggregations must be a list of names, got {_tname(v)}", "aggregations")
    bad = [a for a in v if a not in choices]
    if bad:
        raise RequestError(422, f"unknown aggregation {bad[0]!r}; choose from {list(choices)}", "aggregations")
    return v


def parse_score(body, limits: Limits, aggregations) -> tuple[str, Any, list[str]]:
    """``/v1/score``: ("steps", Item) | ("candidates", (Item-without-steps, [steps...])) | ("items", [Item])
    and the aggregations asked for."""
    body = _object(body)
    aggs = _aggregations(body, aggregations)
    forms = [k for k in ("steps", "candidates", "items") if k in body]
    if len(forms) != 1:
        raise RequestError(422, "give exactly one of 'steps' (one solution), 'candidates' (several solutions of "
                                f"one problem) or 'items' (several problems); got {forms or 'none'}", None)
    form = forms[0]
    if form == "steps":
        return form, _item(body, limits), aggs
    if form == "items":
        items = body["items"]
        if not isinstance(items, list) or not items:
            raise RequestError(422, f"items must be a non-empty list of {{image, question, steps}} objects, "
                                    f"got {_tname(items) if not isinstance(items, list) else 'an empty list'}", "items")
        _at_most(len(items), limits.max_items, "items", "entries")
        out = [_item(_object(it, f"items[{i}]"), limits, f"items[{i}].") for i, it in enumerate(items)]
        _budget(out, limits)
        return form, out, aggs
    q = _string(_require(body, "question"), "question", limits)
    cands = _candidates(body["candidates"], limits, "step lists", "solutions")
    lists = [_steps(c, f"candidates[{i}]", limits) for i, c in enumerate(cands)]
    images, key = decode_images(body.get("image"), "image", limits)
    base = Item(images, q, [], _key(key, q))
    _budget([Item(images, q, s) for s in lists], limits)
    return form, (base, lists), aggs


def parse_guide(body, limits: Limits, aggregations) -> dict:
    """``/v1/guide``: {session_id, item (image/question or None), steps, candidates, aggregate}."""
    body = _object(body)
    sid = body.get("session_id")
    if sid is not None and (not isinstance(sid, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", sid)):
        raise RequestError(422, "session_id must be 1-128 characters of [A-Za-z0-9_.:-]", "session_id")
    steps = _steps(body.get("steps", []), "steps", limits, allow_empty=True)
    if len(steps) + 1 > limits.max_steps:
        raise RequestError(413, f"steps has {len(steps)} steps; with the next one that is over the limit of "
                                f"{limits.max_steps}", "steps")
    cands = _candidates(_require(body, "candidates"), limits, "candidate next steps (strings)", "steps")
    cands = [_string(c, f"candidates[{i}]", limits) for i, c in enumerate(cands)]
    agg = body.get("aggregate", "last")
    if agg not in aggregations:
        raise RequestError(422, f"unknown aggregation {agg!r}; choose from {list(aggregations)}", "aggregate")
    item = None
    if "question" in body or "image" in body:
        q = _string(_require(body, "question"), "question", limits)
        images, key = decode_images(body.get("image"), "image", limits)
        item = Item(images, q, [], _key(key, q))
        _budget([Item(images, q, steps + [c]) for c in cands], limits)
    elif sid is None:
        raise RequestError(422, "missing field 'question' (needed unless session_id names a live session)", "question")
    return {"session_id": sid, "item": item, "steps": steps, "candidates": cands, "aggregate": agg}


# ------------------------------------------------------------------------------------------------
# token budget
# ------------------------------------------------------------------------------------------------
_TOKENIZER = None
_IMAGE_TOKENS = None


def configure_budget(tokenizer, image_tokens) -> None:
    """Set how tokens are counted: ``tokenizer`` for text, ``image_tokens(h, w)`` for an image."""
    global _TOKENIZER, _IMAGE_TOKENS
    _TOKENIZER, _IMAGE_TOKENS = tokenizer, image_tokens


def count_tokens(item: Item) -> int:
    """Tokens of the question, the steps and the images (the chat template's fixed tokens not counted)."""
    n = 0
    if _TOKENIZER is not None:
        texts = [item.question] + list(item.steps)
        n += sum(len(ids) for ids in _TOKENIZER(texts, add_special_tokens=False)["input_ids"])
    if _IMAGE_TOKENS is not None and item.images:
        n += sum(int(_IMAGE_TOKENS(a.shape[0], a.shape[1])) for a in item.images)
    return n


def _budget(items: list[Item], limits: Limits) -> int:
    # images are shared by the candidates of one problem: counted once per item all the same (they are
    # encoded for every candidate whose prefix is not shared)
    total = sum(count_tokens(it) for it in items)
    if total > limits.max_request_tokens:
        raise RequestError(413, f"the request holds {total} tokens (question, steps and image tokens), over the "
                                f"limit of {limits.max_request_tokens}", None)
    return total


def check_budget(items: list[Item], limits: Limits) -> int:
    return _budget(items, limits)


# ------------------------------------------------------------------------------------------------
# vLLM-compatible /pooling and /classify
# ------------------------------------------------------------------------------------------------
# request fields of vLLM's PoolingCompletionRequest / PoolingChatRequest / ClassificationRequest that are
# accepted and ignored (they do not change what a PRM computes here)
IGNORED_FIELDS = {"model", "user", "request_id", "priority", "add_special_tokens", "cache_salt", "embed_dtype",
                  "endianness", "padding", "truncation_side", "media_io_kwargs"}
# accepted only at their default value (None / False / "float" / True)
DEFAULT_ONLY = {"truncate_prompt_tokens": None, "dimensions": None, "add_generation_prompt": False,
                "continue_final_message": False, "chat_template": None, "chat_template_kwargs": None,
                "mm_processor_kwargs": None, "encoding_format": "float"}

_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)(?:<\|im_end\|>\n?|$)", re.S)
_VISION = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")


def parse_chatml(text: str, field: str) -> list[dict]:
    """The messages of a prompt rendered with the (Qwen ChatML) chat template."""
    pos, msgs = 0, []
    text = text.lstrip()
    for m in _TURN.finditer(text):
        if m.start() != pos and text[pos:m.start()].strip():
            raise RequestError(422, f"{field}: text outside <|im_start|>...<|im_end|> turns at character {pos}", field)
        content = m.group(2)
        if _VISION.search(content) or "<|image_pad|>" in content:
            raise RequestError(422, f"{field}: the completion form carries no image data; send images with the chat "
                                    "form ('messages' with image_url parts)", field)
        msgs.append({"role": m.group(1), "content": content})
        pos = m.end()
    if not msgs or text[pos:].strip():
        raise RequestError(422, f"{field}: expected the PRM prompt rendered with its chat template "
                                "(<|im_start|>role\\n...<|im_end|> turns)", field)
    return msgs


def _parts(content, field: str) -> tuple[str, list]:
    """(text, image strings) of a message's content: a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(422, f"{field} must be a string or a list of content parts, got {_tname(content)}", field)
    texts, images = [], []
    for i, p in enumerate(content):
        f = f"{field}[{i}]"
        if not isinstance(p, dict):
            raise RequestError(422, f"{f} must be a content part object, got {_tname(p)}", f)
        kind = p.get("type")
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise RequestError(422, f"{f}.text must be a string", f + ".text")
            texts.append(p["text"])
        elif kind == "image_url":
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise RequestError(422, f"{f}.image_url.url must be a string (a data URL or base64)", f + ".image_url")
            images.append(url)
        elif kind in ("image", "input_image"):
            raise RequestError(422, f"{f}: an image part needs its data: use {{'type': 'image_url', 'image_url': "
                                    "{'url': 'data:image/png;base64,...'}}", f)
        else:
            raise RequestError(422, f"{f}: unsupported content part type {kind!r} (text and image_url are)", f)
    return "".join(texts), images


def _first_turn_layout() -> tuple[str, str]:
    """The PRM's first user turn is ``{head}{question}{sep}{first step}``: (head, sep)."""
    from jaxprm.data.prompt import first_turn_text

    q, s = "\x00Q\x00", "\x00S\x00"
    t = first_turn_text(q, s)
    head, rest = t.split(q, 1)
    sep = rest.split(s, 1)[0]
    return head, sep


def chat_to_item(messages, system_prompt: str, limits: Limits, field: str = "messages") -> tuple[Item, list]:
    """A PRM conversation (OpenAI chat messages) -> (Item, the image strings, still encoded).

    The conversation is the one the PRM scores (``jaxprm.data.prompt.build_messages``): an optional system
    turn (must be the PRM's own system prompt), a first user turn with the image parts and either the
    first-turn text (``### Question:\\n{question}\\n\\n### Solution Process:\\n{step 1}``) or the question
    alone, then one user turn per step. Assistant turns are the label slots: their content is ignored
    (every step is scored with the placeholder, as ``PRM.score`` does)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, f"{field} must be a non-empty list of chat messages", field)
    head, sep = _first_turn_layout()
    question, steps, images = None, [], []
    for i, msg in enumerate(messages):
        f = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(422, f"{f} must be a message object, got {_tname(msg)}", f)
        role = msg.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError(422, f"{f}.role must be 'system', 'user' or 'assistant', got {role!r}", f + ".role")
        text, imgs = _parts(msg.get("content", ""), f + ".content")
        if role == "system":
            if i != 0:
                raise RequestError(422, f"{f}: a system message must come first", f)
            if text.strip() != system_prompt.strip():
                raise RequestError(422, f"{f}: the system message differs from the PRM's system prompt; leave it out "
                                        "(the PRM always scores with its own)", f + ".content")
            continue
        if role == "assistant":
            if imgs:
                raise RequestError(422, f"{f}: assistant turns cannot hold images", f)
            continue
        if question is None:
            images = imgs
            if text.startswith(head) and sep in text[len(head):]:
                question, first = text[len(head):].split(sep, 1)
                steps.append(first)
            else:
                question = text
            continue
        if imgs:
            raise RequestError(422, f"{f}: images are only supported in the first user turn", f)
        steps.append(text)
    if question is None:
        raise RequestError(422, f"{field}: no user turn (the question and the steps are user turns)", field)
    if not steps:
        raise RequestError(422, f"{field}: no steps to score (one user turn per step after the question)", field)
    if len(steps) > limits.max_steps:
        raise RequestError(413, f"{field}: {len(steps)} steps, over the limit of {limits.max_steps}", field)
    if len(images) > limits.max_images:
        raise RequestError(413, f"{field}: {len(images)} images, over the limit of {limits.max_images}", field)
    question = _string(question, f"{field} question", limits)
    steps = [_string(s, f"{field} step {k}", limits) for k, s in enumerate(steps)]
    return Item(None, question, steps), images


def parse_pooling(body, limits: Limits, system_prompt: str, tokenizer, *, endpoint: str) -> list[Item]:
    """vLLM's PoolingRequest / ClassificationRequest (completion form ``input`` or chat form
    ``messages``) -> one Item per prompt. ``endpoint``: "pooling" or "classify"."""
    body = _object(body)
    if endpoint == "pooling":
        task = body.get("task")
        if task is not None and task != "token_classify":
            raise RequestError(422, f"task {task!r} is not supported: this PRM server serves task 'token_classify' "
                                    "(one [P(+), P(-)] row per step)", "task")
    for k, default in DEFAULT_ONLY.items():
        if k in body and body[k] != default:
            raise RequestError(422, f"{k}={body[k]!r} is not supported by this server (only {default!r})", k)
    if body.get("use_activation") is False:
        raise RequestError(422, "use_activation=false is not supported: the server returns probabilities", "use_activation")
    known = IGNORED_FIELDS | set(DEFAULT_ONLY) | {"input", "messages", "task", "use_activation"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}", unknown[0])
    forms = [k for k in ("input", "messages") if k in body]
    if len(forms) != 1:
        raise RequestError(422, "give exactly one of 'input' (completion form) or 'messages' (chat form)", None)
    items: list[Item] = []
    if forms[0] == "messages":
        item, imgs = chat_to_item(body["messages"], system_prompt, limits)
        item.images, _ = decode_images(imgs or None, "messages image", limits)
        items.append(item)
    else:
        v = body["input"]
        if isinstance(v, str):
            prompts = [v]
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            prompts = list(v)
        elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            prompts = [_decode_ids(tokenizer, v, "input")]
        elif isinstance(v, list) and v and all(isinstance(x, list) for x in v):
            prompts = [_decode_ids(tokenizer, x, f"input[{i}]") for i, x in enumerate(v)]
        else:
            raise RequestError(422, "input must be a string, a list of strings, a list of token ids or a list of "
                                    "token id lists (non-empty)", "input")
        _at_most(len(prompts), limits.max_items, "input", "prompts")
        for i, p in enumerate(prompts):
            f = "input" if len(prompts) == 1 and isinstance(v, str) else f"input[{i}]"
            item, _ = chat_to_item(parse_chatml(p, f), system_prompt, limits, field=f)
            items.append(item)
    _budget(items, limits)
    return items


def _decode_ids(tokenizer, ids, field: str) -> str:
    if not ids or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        raise RequestError(422, f"{field} must be a non-empty list of token ids", field)
    vocab = len(tokenizer)
    bad = [x for x in ids if x < 0 or x >= vocab]
    if bad:
        raise RequestError(422, f"{field}: token id {bad[0]} is outside the vocabulary [0, {vocab})", field)
    return tokenizer.decode(ids, skip_special_tokens=False)
