"""The nearest-neighbour index of a cache's rows (faiss), built once and kept beside the cache, keyed by its
fingerprint (to be written: issue 27)."""
