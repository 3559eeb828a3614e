"""Prefect tasks: one module per pipeline stage, each task one call into the library.

What only Prefect does lives here: retries on I/O, run names, logging through the run logger,
artifacts for the UI. No statistics here.
"""
