"""Looking at the data and the runs: audit (copies, near-duplicates, likely mislabelled images) with its exact
neighbour search (neighbours), projection (the embeddings in 2-D, a picture and a page), drift (do new images look
like the training data?), the pictures and page of a run folder (pictures, report), and what they share (plots,
gallery, html).
"""
