"""Input: reading datasets (Parquet, JSONL, CSV, OpenAI Batch) and building requests from rows."""
