"""Engines wrap the model for data parallelism behind one small interface."""
