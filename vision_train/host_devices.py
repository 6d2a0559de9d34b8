"""What the hardware settings ask of XLA through the environment, before JAX starts.

``XLA_FLAGS`` (simulated CPU devices) is read when JAX's backend starts and ``JAX_PLATFORMS`` when ``jax`` is
imported: the command lines call ``configure_host_devices`` before they import anything that imports JAX.
This module imports nothing that does (``vision_train.parallel``, the mesh, is what comes after).
"""

from __future__ import annotations

import os


def configure_host_devices(platform: str, num_devices: int) -> None:
    """Before JAX initialises: ask XLA for ``num_devices`` simulated CPU devices when running on CPU."""
    if platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if num_devices > 1:
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
            flags.append(f"--xla_force_host_platform_device_count={num_devices}")
            os.environ["XLA_FLAGS"] = " ".join(flags)
