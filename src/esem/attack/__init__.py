"""The attack suite: every adversary of the threat model, legacy beside esem.

Each module ``aN_*.py`` plays one adversary for real; ``runner`` runs them on an
embedded service (or a given socket) and prints the table of ``esem attack``.
"""

from esem.attack.base import BACKENDS, Outcome, Target

__all__ = ["BACKENDS", "Outcome", "Target"]
