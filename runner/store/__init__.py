"""Storage: the run folder, the journal and start log, Parquet parts, the manifest and the lock."""
