"""``python -m jaxprm.serve --prm DIR``: an HTTP scoring server for a PRM (FastAPI + uvicorn).

Endpoints (docs/serving.md): ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text),
``POST /v1/score`` (one solution, N candidates of one problem, or several problems), ``POST /v1/guide``
(one guided-search iteration on a session's K/V cache), and vLLM-compatible ``POST /pooling``
(``task="token_classify"``: one ``[P(+), P(-)]`` row per step) and ``POST /classify``. Concurrent
requests are gathered for a few milliseconds into the scorer's shape buckets (dynamic batching).
``jaxprm.scoring.RemotePRM(url)`` is the client with the ``PRM`` interface.

``create_app(prm, ...)`` builds the ASGI app around a loaded PRM (``jaxprm.serve.app``); ``main(argv)``
is the command line (``jaxprm.serve.cli``).
"""
from jaxprm._lazy import lazy_attributes

_LAZY = {"create_app": ".app", "main": ".cli", "Limits": ".inputs", "RequestError": ".inputs",
         "parse_prometheus": ".metrics"}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
