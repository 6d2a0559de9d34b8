"""Data: ``load`` picks a config's data set, from ``sources`` (the built-in sets as arrays) or ``files`` (your own
images: folders, Hugging Face); ``stream`` reads batches on the host for the streamed feed; ``pipeline`` batches
and augments inside jit.

Nothing is imported here: Grain's worker processes import ``stream`` (numpy only) through this package."""
