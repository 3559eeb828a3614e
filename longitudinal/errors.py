"""The project's own exceptions.

Each message names the value at fault and what to do about it. The command line turns them into one
line on stderr and an exit code: 2 for usage and configuration errors, 1 when the data make the
pipeline fail.
"""

from __future__ import annotations


class LongitudinalError(Exception):
    """Base class: a failure the user can act on, reported without a traceback."""

    exit_code = 1


class ConfigError(LongitudinalError):
    """The study config (or the command line) is wrong: unknown key, bad value, bad formula."""

    exit_code = 2


class FormulaError(ConfigError):
    """A candidate formula cannot be parsed or is not supported."""


class DataError(LongitudinalError):
    """A table-level problem with the data: missing column, no rows, too few subjects, unreadable file."""


class SourceUnavailable(DataError):
    """A data file that exists could not be read just now (locked, being replaced, permissions): worth a retry."""


class OutputUnwritable(LongitudinalError):
    """A folder the pipeline writes to refused the write: the disk is full or over quota, the file system
    is read-only, or the user may not write there. Not the data's fault: the same run succeeds once the
    folder takes writes again."""


class FitError(LongitudinalError):
    """No candidate could be fitted, or a fit that the run needs failed."""
