"""Moved to ``jaxprm.scoring`` (``.prm``: PRM, load_prm; ``.device``: Scorer); kept so old imports work."""
from jaxprm.scoring import *  # noqa: F401,F403
from jaxprm.scoring import __all__  # noqa: F401
from jaxprm.scoring.device import _check_buckets, _Compiled, _compiled_for  # noqa: F401
from jaxprm.scoring.prm import (_check_question_steps, _Continuation, _Encoded, _is_single_image,  # noqa: F401
                                _resolve_dtype)
