"""Fitness functions: how good a compressed candidate is on calibration tokens.

Each module registers its fitness by name (:func:`evosearch.registry.register_fitness`); the
``evosearch.fitness`` entry points of ``pyproject.toml`` load them.
"""

from fitness.kl import KLDivergence
from fitness.perplexity import Perplexity

__all__ = ["KLDivergence", "Perplexity", "get_fitness"]


def get_fitness(name: str, **kwargs):
    """A registered fitness by name (``kl``, ``ppl``), with constructor ``kwargs``."""
    from evosearch import registry

    return registry.fitness(name, **kwargs)
