"""A run folder (models/NAME), the one owner of its files: record (run.json, typed), folder (writing and loading a
run), mistakes (errors.csv), reference (reference.npz: what predict compares new images with), listing (`runs`).
"""
