"""Test-time scaling with a PRM: aggregation, best-of-N, guided greedy search, policies.

    from jaxprm.search import best_of_n, guided_greedy_search
    best = best_of_n(prm, image, question, candidates, aggregate="mean")

Names are imported lazily (the sampler and the scoring names pull in JAX; the rest does not).
``PRM``, ``Scorer`` and ``load_prm`` live in ``jaxprm.scoring``; they stay importable from here.
"""
from jaxprm._lazy import lazy_attributes

_LAZY = {
    **{n: ".search" for n in ("best_of_n", "guided_greedy_search", "SearchResult", "score_candidates", "score_orm",
                              "aggregate_scores", "AGGREGATE_CHOICES")},
    **{n: ".policy" for n in ("Policy", "JaxPolicy", "OpenAIPolicy", "ScriptedPolicy", "DEFAULT_INSTRUCTION",
                              "format_question")},
    **{n: ".steps" for n in ("split_steps", "split_steps_with_kinds", "join_steps", "clean_step", "has_answer",
                             "extract_final_answer")},
    **{n: ".sampler" for n in ("Sampler", "Generation", "sample_logits", "apply_top_k", "apply_top_p")},
    "AGGREGATIONS": ".aggregate",  # (the function `aggregate` stays in jaxprm.search.aggregate: same name as the module)
    **{n: "jaxprm.scoring" for n in ("PRM", "Scorer", "load_prm")},
    "OpenAIChatClient": ".openai_client",
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
