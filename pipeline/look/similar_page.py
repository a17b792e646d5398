"""The page of `similar --html`: each query and its nearest cached images as thumbnails (to be written: issue 27)."""
