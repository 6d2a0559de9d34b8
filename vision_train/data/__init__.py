"""Data: ``sources`` turns data sets into arrays, ``pipeline`` batches and augments them inside jit."""
