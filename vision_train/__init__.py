"""vision_train: image classification in JAX/Flax, composed by Hydra, tracked in W&B.

The package imports nothing heavy at the top level: ``python -m vision_train`` must be able to set
``XLA_FLAGS`` (simulated CPU devices) before JAX initialises.
"""

import time as _time

__version__ = "0.1.0"

# When this process imported the package, and how many jobs it has run: a job's start-up is timed from
# here for the process's first job, from the job's own start for later ones. (Read as an attribute of
# this module: a launcher that ships the task function to a worker by value must not copy it.)
PROCESS = {"started": _time.time(), "jobs": 0}
