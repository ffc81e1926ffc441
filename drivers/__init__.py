"""Southbound drivers and the contracts they share (SampleBatch, series table, registry)."""
