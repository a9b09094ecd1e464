"""The composition root: the ``briefs`` command, the process host and the services it runs.

This package wires the layers below it together and nothing imports it (CI checks that with the
import contract in ``pyproject.toml``). ``python -m briefs``, ``python -m worker`` and
``python -m scheduler`` all enter here.
"""
