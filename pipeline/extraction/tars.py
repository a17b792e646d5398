"""WebDataset tar shards as a dataset: discovery (brace patterns, the class and split of each sample) and reading,
each shard sequentially by one worker (to be written: issue 27)."""
