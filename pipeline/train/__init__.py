"""Stage two, `pipeline train-head` and `evaluate`: config (what was asked), loading (how the cache is read: in
memory or streamed, which poolings, views, refit), data (the splits), sweep (every candidate scored on validation),
runner (the stage from end to end), evaluate (a saved run scored again), tracking (MLflow).
"""
