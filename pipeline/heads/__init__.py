"""Stage two's models: classifier heads on cached features, each with scikit-learn's estimator contract.

registry (each head one entry: estimator, swept grids, defaults), base (what every head shares), normalise (the one
feature normalisation, in numpy and torch), holdout (rows held out for early stopping), logreg with its solver
(logreg_solver), linear with its wide sweep (wide), knn, block5 (fine-tuning VGG16's last block), exported (the
heads as torch modules), metrics (scores of probabilities). A head reads rows given to it (arrays, or a split
streamed from the cache: cache/stream.py), and saves itself as the plain arrays of a run's head.npz (registry);
nothing here opens a cache or lays out a run folder.
"""
