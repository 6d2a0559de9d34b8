"""vision_train: image classification in JAX/Flax, composed by Hydra, tracked in W&B.

The package imports nothing heavy at the top level: ``python -m vision_train`` must be able to set
``XLA_FLAGS`` (simulated CPU devices) before JAX initialises.
"""

__version__ = "0.1.0"
