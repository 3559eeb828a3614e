"""Rendering and writing records: figures, the HTML report, the run folder. Computes no statistics; may import
every earlier package.
"""
