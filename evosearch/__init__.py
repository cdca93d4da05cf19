"""evosearch: find the best compressed version of a large language model by search.

The front door is :func:`run` (the whole pipeline, with a user's own fitness or space); the
rest are the types a user's components meet and the ``register_*`` functions that plug them in.
"""

from evosearch.api import run
from evosearch.config import SearchConfig
from evosearch.data import DataSpec
from evosearch.engine import search
from evosearch.evaluation import Batch, Candidate, Fitness, as_fitness
from evosearch.genome import Genome, LevelSpec
from evosearch.models import load_model
from evosearch.problem import Problem
from evosearch.registry import (
    SpaceContext,
    register_baseline,
    register_fitness,
    register_space,
    register_strategy,
)
from evosearch.space import SearchSpace
from evosearch.strategies import EvoPress, Request, Stage
from evosearch.strategy import Strategy

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Candidate",
    "DataSpec",
    "EvoPress",
    "Fitness",
    "Genome",
    "LevelSpec",
    "Problem",
    "Request",
    "SearchConfig",
    "SearchSpace",
    "SpaceContext",
    "Stage",
    "Strategy",
    "as_fitness",
    "load_model",
    "register_baseline",
    "register_fitness",
    "register_space",
    "register_strategy",
    "run",
    "search",
]
