"""The PRM as users hold it: ``load_prm`` -> ``PRM.score / score_batch / score_candidates /
incremental_scorer``, and the bucketed, jitted device functions under it.

    from jaxprm.scoring import load_prm
    prm = load_prm(path)
    prm.score(image, question, steps)

``jaxprm.scoring.prm``: the host side (prompts, images, M-RoPE positions; ``PRM``, ``IncrementalScorer``,
``load_prm``). ``jaxprm.scoring.remote``: ``RemotePRM(url)``, the same interface over HTTP
(a server started with ``python -m jaxprm.serve``). ``jaxprm.scoring.device``: the device side (``Scorer``: buckets, the jitted functions
shared per model graph, K/V caches). Importing this package imports JAX; ``import jaxprm`` does not
(``jaxprm.load_prm`` / ``jaxprm.PRM`` import it on first use).
"""
from jaxprm.scoring.device import (DEFAULT_BATCH_BUCKETS, DEFAULT_LENGTH_BUCKETS, DEFAULT_PATCH_BUCKETS,
                                   DEFAULT_SUFFIX_BUCKETS, KVCache, Scorer, SuffixKV, TokenSequence, bucket_size)
from jaxprm.scoring.prm import PRM, IncrementalScorer, load_prm
from jaxprm.scoring.remote import RemotePRM

__all__ = sorted(["PRM", "IncrementalScorer", "load_prm", "RemotePRM", "Scorer", "TokenSequence", "KVCache", "SuffixKV",
                  "bucket_size", "DEFAULT_LENGTH_BUCKETS", "DEFAULT_SUFFIX_BUCKETS", "DEFAULT_PATCH_BUCKETS",
                  "DEFAULT_BATCH_BUCKETS"])
