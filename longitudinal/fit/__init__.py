"""One candidate -> one ``Fit`` record: shared kernels (linalg, theta, optimize, scaling, wald), one folder per
model class (``lmm/``), and ``candidate`` whatever the engine. May import ``model``, ``data`` and the edges.
"""
