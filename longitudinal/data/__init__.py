"""Everything before a model exists: reading sources, the curated store, the landing watcher, durable writes,
validation rules. Imports only the edges (errors, config, records).
"""
