"""Fitness functions: how good a compressed candidate is on calibration tokens."""

from fitness.kl import KLDivergence
from fitness.perplexity import Perplexity

__all__ = ["KLDivergence", "Perplexity", "get_fitness"]

_REGISTRY = {"kl": KLDivergence, "ppl": Perplexity, "perplexity": Perplexity}


def get_fitness(name: str, **kwargs):
    """A built-in fitness by name: ``kl`` or ``ppl``."""
    try:
        return _REGISTRY[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown fitness {name!r}; choose from {sorted(_REGISTRY)}") from None
