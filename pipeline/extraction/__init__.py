"""Stage one, `pipeline extract`: every image of a dataset through the frozen body once, into a cache.

A folder of roles, read in the order the data flows: config (what was asked), dataset (find the images), plan
(which rows are new or changed), augment (the views of a training image), reader (decode in DataLoader workers),
embed (run the body, commit to the journal), journal (crash-safe partial results), distributed (a torchrun rank or a
job-array part), runner (the stage from end to end, ending with the cache written by cache.writer).
"""
