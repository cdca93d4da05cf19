"""The jobs behind the ``evosearch`` commands: search, baselines, export, finetune, perplexity.

Nothing here knows a space or a fitness by name: they come from :mod:`evosearch.registry`.
"""
