"""evosearch: find the best compressed version of a large language model by search."""

from evosearch.arch import ARCHITECTURES, UnsupportedArchitectureError, arch_for
from evosearch.data import DataSpec, TokenData, load_token_data
from evosearch.engine import Evaluator, SearchResult, search
from evosearch.evaluation import Batch, CallableFitness, Candidate, Fitness, as_fitness
from evosearch.forward import DenseCache, compute_dense_cache
from evosearch.genome import Genome, LevelSpec
from evosearch.models import load_compressed, load_model
from evosearch.strategies import EvoPress, EvoPressConfig, RandomSearch, Request, Stage
from evosearch.strategy import Strategy

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "Batch",
    "CallableFitness",
    "Candidate",
    "DataSpec",
    "DenseCache",
    "Evaluator",
    "EvoPress",
    "EvoPressConfig",
    "Fitness",
    "Genome",
    "LevelSpec",
    "RandomSearch",
    "Request",
    "SearchResult",
    "Stage",
    "Strategy",
    "TokenData",
    "UnsupportedArchitectureError",
    "arch_for",
    "as_fitness",
    "compute_dense_cache",
    "load_compressed",
    "load_model",
    "load_token_data",
    "search",
]
