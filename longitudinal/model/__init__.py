"""The formula language (lme4 terms), data-dependent transforms and design matrices. May import ``data`` and
the edges.
"""
