"""Speed and memory measurements (``make bench``), not part of the test suite; run from the repository's root."""
