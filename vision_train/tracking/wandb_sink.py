"""The W&B sink. Imported only when logging to W&B is on; everything it writes stays under the run dir."""

from __future__ import annotations

import logging
import netrc
import os
import shutil
from urllib.parse import urlparse
from pathlib import Path

log = logging.getLogger("vision_train")


def _has_credentials() -> bool:
    """An API key in the environment, or in the netrc file (``$NETRC``) for the W&B host in use."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _isolate(run_dir: Path) -> None:
    """Keep W&B's files (runs, cache, artifact staging, settings) under ``<run dir>/wandb``, not $HOME.
    The user's W&B settings (e.g. the host chosen by ``wandb login --host``) are copied in, read-only use."""
    user_settings = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb")) / "settings"
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb/.cache"), ("WANDB_DATA_DIR", "wandb/.data"),
                     ("WANDB_CONFIG_DIR", "wandb/.config"), ("WANDB_ARTIFACT_DIR", "wandb/.artifacts")):
        path = run_dir / sub
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    if user_settings.is_file() and not (run_dir / "wandb/.config/settings").exists():
        shutil.copyfile(user_settings, run_dir / "wandb/.config/settings")


class WandbSink:
    def __init__(self, run_dir: Path, config: dict, lc, name: str | None = None, run_id: str | None = None,
                 rewind_to: int | None = None):
        _isolate(Path(run_dir))
        import wandb

        self._wandb = wandb
        mode = lc.mode
        if mode == "auto":
            mode = "online" if _has_credentials() else "offline"
        kwargs = dict(project=lc.project, entity=lc.entity, name=lc.name or name, group=lc.group, tags=list(lc.tags) or None,
                      notes=lc.notes, config=config, dir=str(run_dir), reinit="finish_previous",
                      id=run_id, resume="allow" if run_id else None)
        settings = wandb.Settings(init_timeout=lc.init_timeout_s, console="off")
        if run_id and rewind_to is not None and mode == "online":
            # Resuming after a crash: rewind the W&B run to the checkpoint, so the steps the dead attempt
            # logged after it are replaced, not duplicated (needs a server with run rewind).
            try:
                rewind = {k: v for k, v in kwargs.items() if k not in ("id", "resume")}
                self.run = wandb.init(mode=mode, settings=settings, resume_from=f"{run_id}?_step={rewind_to}", **rewind)
                self._finish_init(mode)
                return
            except Exception as e:  # noqa: BLE001
                log.warning("W&B could not rewind run %s (%s); resuming it as is", run_id, str(e).splitlines()[0][:200])
        try:
            self.run = wandb.init(mode=mode, settings=settings, **kwargs)
        except Exception as e:  # unreachable server, bad credentials: never cost the run
            if mode != "online":
                raise
            log.warning("W&B online init failed (%s); continuing offline", str(e).splitlines()[0][:200])
            mode = "offline"
            self.run = wandb.init(mode=mode, settings=wandb.Settings(console="off"), **kwargs)
        self._finish_init(mode)

    def _finish_init(self, mode: str) -> None:
        self.mode = mode
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics: dict, step: int) -> None:
        # Our own "step" is the x-axis (define_metric); W&B's internal _step just counts log calls, so
        # media logged later from the media thread for an earlier step are not dropped as out of order.
        self.run.log({"step": step, **metrics})

    def log_eval(self, split: str, step: int, report: dict, *, labels, preds, class_names, images) -> None:
        wandb = self._wandb
        names = list(class_names)
        payload = {f"{split}/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=labels.tolist(), preds=preds.tolist(), class_names=names, title=f"{split} confusion matrix")}
        for name, path in report["files"].items():
            payload[f"{split}/{name}"] = wandb.Image(str(path))
        sample = report.get("sample")
        if sample is not None:
            per_class = len(names) <= 20
            cols = ["index", "image", "true", "pred", "confidence"] + ([f"p/{n}" for n in names] if per_class
                                                                     else ["probabilities"])
            table = wandb.Table(columns=cols)
            for i, probs in zip(sample["index"], sample["probs"]):
                img = images[i] if images is not None and images.dtype.name == "uint8" else None
                row = [int(i), wandb.Image(img[..., 0] if img is not None and img.shape[-1] == 1 else img)
                       if img is not None else None, names[labels[i]], names[int(probs.argmax())], float(probs.max())]
                row += [float(p) for p in probs] if per_class else [[float(p) for p in probs]]
                table.add_data(*row)
            payload[f"{split}/predictions_table"] = table
        self.run.log({"step": step, **payload})

    def log_checkpoints(self, directory: Path, steps: dict[str, int]) -> None:
        """Checkpoint directories as model artifacts: one per step, aliased "best" and/or "latest"."""
        by_step: dict[int, list[str]] = {}
        for alias, step in steps.items():
            if step is not None:
                by_step.setdefault(step, []).append(alias)
        for step, aliases in sorted(by_step.items()):
            art = self._wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"step": step})
            art.add_dir(str(Path(directory) / str(step)))
            self.run.log_artifact(art, aliases=aliases + [f"step-{step}"])

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
        if self.mode == "offline":
            log.info("W&B run saved offline; upload it with: wandb sync %s", self.run.dir.rsplit("/files", 1)[0])
