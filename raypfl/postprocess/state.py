"""One client-state entry holding both the algorithm's state and the postprocessing steps' state.

When a step is stateful (top-k's error-feedback residual) a client's stored state becomes the plain dict
`{"__raypfl_post__": 1, "algorithm": <algorithm state>, "steps": {step name: ndarray}}`, which
`checkpoint.encode` stores like any other state; otherwise the algorithm's state is stored as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The marker key of a composite client state.
MARKER = "__raypfl_post__"
KEYS = frozenset({MARKER, "algorithm", "steps"})


def join_state(algorithm_state: Any, post_state: dict[str, np.ndarray] | None) -> Any:
    """The stored client state: the algorithm's own when `post_state` is None, else the composite dict."""
    if post_state is None:
        return algorithm_state
    return {MARKER: 1, "algorithm": algorithm_state, "steps": dict(post_state)}


def split_state(stored: Any) -> tuple[Any, dict[str, np.ndarray] | None]:
    """(algorithm state, steps' state) of a stored client state; anything that is not a composite dict is
    the algorithm's state alone, with no steps' state (None)."""
    if type(stored) is dict and set(stored) == KEYS and stored[MARKER] == 1 and type(stored["steps"]) is dict:
        return stored["algorithm"], dict(stored["steps"])
    return stored, None
