"""Reports: prices and costs, and DuckDB over a run's parts (summaries, user SQL, export)."""
