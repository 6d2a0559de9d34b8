"""``python -m vision_train [overrides]``: Hydra composes conf/, then ``train(cfg, run_dir)`` runs."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from .config import register_configs, to_run_config
from .errors import UserError

log = logging.getLogger("vision_train")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no TPU found" noise on CPU/GPU
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    try:
        run_cfg = to_run_config(cfg)  # validated and frozen before JAX starts or anything compiles
        from .parallel import configure_host_devices

        configure_host_devices(run_cfg.hardware.platform, run_cfg.hardware.num_devices)
        from .train.loop import train

        summary = train(run_cfg, HydraConfig.get().runtime.output_dir)
        return summary.get("best/val/acc", summary.get("test/acc"))
    except UserError as e:
        log.error("error: %s", e)
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # one bad job must not end the sweep; the error is in its log
        sys.exit(2)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
