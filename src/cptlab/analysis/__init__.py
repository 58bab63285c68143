"""Analyses over a run's records and checkpoints: pure functions, no training code."""
