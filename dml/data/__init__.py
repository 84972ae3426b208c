"""Data: raw sources -> WebDataset shards + manifest, and loaders that read them per rank."""
