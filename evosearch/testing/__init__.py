"""Contract checks shipped with evosearch, for its own tests and for third-party components
(as ``optuna.testing``): :mod:`evosearch.testing.strategy` checks a
:class:`~evosearch.strategy.Strategy`."""
