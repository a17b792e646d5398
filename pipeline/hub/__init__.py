"""The cache as a hub: its rows out as Parquet for the tools people already have (parquet.py), and the nearest
cached images to a query from an index kept beside the cache (index.py, similar.py)."""
