"""Foundations every layer may import: typed config loading (``core.config``) and the
live-settings vocabulary (``core.settings``).

This package imports nothing else of the project, so ``comms``, ``stages`` and
``runtime`` can all build on it without an upward arrow or a cycle
(``tests/test_layers.py`` keeps it that way).
"""
