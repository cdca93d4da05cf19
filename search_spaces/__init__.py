"""Search spaces: which compressed versions of a model the search may visit."""

from search_spaces.layer_drop import LayerDropSpace

__all__ = ["LayerDropSpace"]
