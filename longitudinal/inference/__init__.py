"""Comparing fits that exist: information criteria and selection, likelihood-ratio tests. May import ``fit``,
``model``, ``data`` and the edges.
"""
