"""User-facing errors. Anything raised as ``UserError`` is printed without a traceback and exits 2."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input from the user: the message names the problem and how to fix it."""

    exit_code = 2


class MissingWeightsError(UserError):
    """Pretrained weights were asked for and are not on disk (and the network is not reachable)."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ``did you mean ...?`` suffix naming the nearest valid choices, or a list of all when none is near."""
    choices = sorted(set(choices))
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if near:
        return "did you mean " + " or ".join(repr(c) for c in near) + "?"
    shown = ", ".join(choices[:20]) + (" ..." if len(choices) > 20 else "")
    return f"valid choices: {shown}" if choices else "nothing is registered"
