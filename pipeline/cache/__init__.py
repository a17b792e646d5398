"""The feature cache: the HDF5 format that stage one writes and every later command reads.

identity (what a cache holds, its fingerprint), record (a row), header (the root attributes), pools (how a
convolutional map becomes a vector, by name and size), schema (the HDF5 layout), store (the reader), validate (the
checks on opening), writer (the atomic writer), stream (reading splits larger than memory), summary (what `info`
shows). Only store, validate, writer and schema import h5py; identity, record, header and pools import neither h5py
nor torch, so the types that cross into the stages carry no heavy import.
"""
