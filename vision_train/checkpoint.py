"""Checkpoints with Orbax: ``<run dir>/checkpoints/<step>/{state,meta}``.

A checkpoint holds the whole TrainState (params, optimizer state, step, RNG key, the model's other
state), the training loop's running sums (so the log interval in progress resumes exactly), and JSON
metadata: the resolved config, the W&B run id, package versions, the best metric so far and the
parameter shapes. Orbax writes each step into a temporary directory and renames it when complete, so
a checkpoint half-written when the process died is never listed; saves are asynchronous (arrays are
copied to host memory, then written on a background thread while training goes on).

Restores target the *current* mesh's shardings, so a checkpoint written on 8 devices restores on 1 and
the other way round.

Failures are one line (a ``UserError``): a full disk names the checkpoint (step and path) that could not be
written, whether the failure happened in the call or in a background save surfacing later (at the next
save, ``wait`` or ``close``); the failed step's temporary directory is removed, the earlier checkpoints
stay as they were. A checkpoint that cannot be read names its step and the earlier steps to use instead.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from .fate import locate
from .errors import DiskFull, UserError, disk_full_reason, one_line, remove_quietly

log = logging.getLogger("vision_train")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, foreign, or for another model."""


class DamagedCheckpoint(CheckpointError):
    """A complete checkpoint (Orbax committed it) whose files cannot be read back: damaged on disk. The
    message names the step and the earlier steps to use instead, as the value of ``key``
    (``trainer.resume`` when training resumes, ``checkpoint`` for evaluate/predict): ``for_key``."""

    def __init__(self, directory: Path, step: int, why: str, earlier: list[int], key: str = "trainer.resume"):
        self.directory, self.step, self.why, self.earlier, self.key = Path(directory), step, why, list(earlier), key
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.directory / str(self.step)
        head = f"the checkpoint at step {self.step} ({where}) is damaged: {self.why}"
        if not self.earlier:
            fix = ("start over with trainer.resume=never (it sets the damaged checkpoints aside)"
                   if self.key == "trainer.resume" else "train again, or give another run's checkpoint")
            return f"{head}; there is no earlier checkpoint in {self.directory}: {fix}"
        use = f"{self.key}={self.directory / str(self.earlier[-1])}"
        if len(self.earlier) == 1:
            return f"{head}; the earlier step {self.earlier[0]} is in {self.directory}: use it, {use}"
        steps = ", ".join(map(str, self.earlier))
        return f"{head}; earlier steps in {self.directory}: {steps}; use one, e.g. {use}"

    def for_key(self, key: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(self.directory, self.step, self.why, self.earlier, key)


def _why(e: Exception) -> str:
    """One line for an Orbax/TensorStore failure (their messages end in a long repr of the spec)."""
    return f"{type(e).__name__}: " + str(e).splitlines()[0].split(" See full TensorStore details")[0][:300]


def param_shapes(params) -> dict[str, list[int]]:
    return {jax.tree_util.keystr(path): list(np.shape(x)) for path, x in jax.tree_util.tree_leaves_with_path(params)}


def find(path: str | Path) -> tuple[Path, int | None]:
    """A run dir, its checkpoints dir, or one step's dir -> (checkpoints dir, step or None for the latest)."""
    return locate(path)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, best_metric: str | None = "val/acc",
                 best_mode: str = "max", read_only: bool = False):
        self.directory = Path(directory)
        policies = [cm.LatestN(n=keep)]
        if best_metric:
            policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies), create=not read_only, read_only=read_only,
            enable_async_checkpointing=True, cleanup_tmp_directories=not read_only)
        self.best_metric = best_metric
        self._pending: int | None = None  # the step whose asynchronous save may still be running
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; the user needs one message
            raise CheckpointError(f"cannot open checkpoints in {self.directory}: {_why(e)}") from None

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def resolve_step(self, step: int | None) -> int:
        """``step``, or the latest when None; a CheckpointError when it is not a complete checkpoint here."""
        available = self.steps()
        if not available:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return max(available)
        if step not in available:
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}; there are {available}")
        return step

    def best(self) -> int | None:
        return self.manager.best_step() if self.best_metric else None

    def save(self, step: int, items: dict, meta: dict, metrics: dict | None = None, *, force: bool = True) -> None:
        """Start saving ``step`` (written on a background thread). A failure of the previous save surfaces
        here, as a ``DiskFull``/``CheckpointError`` naming that save's step."""
        if self.best_metric and metrics and self.best_metric not in metrics:
            metrics = None
        self.wait()  # (Orbax waits for the previous save anyway; here its failure is attributed to its step)
        self._pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(items),
                                                            meta=ocp.args.JsonSave(meta)),
                              metrics=metrics, force=force)
        except Exception as e:
            self._pending = None
            if isinstance(e, OSError) or disk_full_reason(e):  # (anything else, e.g. a step saved already: as is)
                self._save_failed(step, e)
            raise

    def _save_failed(self, step: int, e: Exception):
        """The save of ``step`` failed: its temporary directory goes, the error is one line."""
        with contextlib.suppress(Exception):  # Orbax's threads end (a second wait does not raise the error again)
            self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                remove_quietly(tmp)
        earlier = [s for s in self._complete_steps() if s < step]
        note = (f"the earlier checkpoint{'s' * (len(earlier) > 1)} (step{'s' * (len(earlier) > 1)} "
                f"{', '.join(map(str, earlier))}) {'are' if len(earlier) > 1 else 'is'} intact" if earlier
                else "there is no earlier checkpoint")
        reason = disk_full_reason(e)
        if reason:
            raise DiskFull(self.directory / str(step), f"the checkpoint at step {step}", reason, note) from None
        raise CheckpointError(f"the checkpoint at step {step} could not be written to {self.directory / str(step)} "
                              f"({_why(e)}); {note}") from None

    def _complete_steps(self) -> list[int]:
        """Steps with a committed checkpoint on disk (read from the directory, not Orbax's memory)."""
        try:
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())
        except OSError:
            return []

    def damaged(self, step: int, why: str) -> DamagedCheckpoint:
        """The error for a checkpoint of this directory that cannot be read (names the earlier steps)."""
        return DamagedCheckpoint(self.directory, step, why, [s for s in self.steps() if s < step])

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise self.damaged(step, f"its metadata cannot be read ({_why(e)})") from None

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """``target``: a pytree of jax.ShapeDtypeStruct with the current mesh's shardings."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            if "tree structures do not match" in str(e):
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} holds a train state of another structure than this "
                    f"run's (another optimizer or optimizer setting, e.g. optimizer.name or gradient clipping on/off, "
                    f"or a checkpoint from an earlier version of vision_train); resume with the settings that wrote "
                    f"it, or start over with trainer.resume=never") from None
            raise self.damaged(step, f"it could not be restored ({_why(e)})") from None
        return out["state"], out["meta"]

    def wait(self) -> None:
        """Until the save in flight is written; its failure is a ``DiskFull``/``CheckpointError``."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            step, self._pending = self._pending, None
            if step is None:
                raise CheckpointError(f"a checkpoint could not be written to {self.directory}: {_why(e)}") from None
            self._save_failed(step, e)
        self._pending = None

    def close(self) -> None:
        """Wait for the save in flight, then release Orbax's threads. The save's failure is raised (a failure
        raised already, by ``save`` or ``wait``, is not raised again)."""
        error = None
        try:
            self.wait()
        except UserError as e:
            error = e
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 - (a failure already reported by wait)
            log.debug("closing the checkpoint manager: %s", one_line(e))
        if error is not None:
            raise error


def check_compatible(meta: dict, shapes_now: dict[str, list[int]], where: Path) -> None:
    """Refuse, naming what differs, to restore a checkpoint into a model of other shapes."""
    before = meta.get("param_shapes")
    if before is None:
        raise CheckpointError(f"{where} is not a vision_train checkpoint (no parameter shapes in its metadata)")
    if before == shapes_now:
        return
    diffs = [f"{k}: checkpoint {before.get(k)} vs now {shapes_now.get(k)}"
             for k in sorted(set(before) | set(shapes_now)) if before.get(k) != shapes_now.get(k)]
    arch = meta.get("config", {}).get("model", {}).get("arch", "?")
    raise CheckpointError(
        f"the checkpoint in {where} was written for other model shapes ({len(diffs)} differ; its model was "
        f"{arch}): " + "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "") +
        ". Use the config it was trained with (see its config.yaml), or trainer.resume=never to start over")


def abstract_like(tree, sharding=None):
    """ShapeDtypeStructs of ``tree`` placed with ``sharding``, or where each array of ``tree`` is (None): a restore
    onto the current mesh, whatever mesh and device count wrote the checkpoint."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                       sharding=x.sharding if sharding is None else sharding), tree)


def read_meta(path: str | Path) -> tuple[Path, int, dict]:
    """A run dir, its checkpoints dir or one step's dir -> (the checkpoints dir, the step (the latest unless one
    is named), that step's JSON metadata). No array is read."""
    directory, step = find(path)
    ckpt = Checkpointer(directory, best_metric=None, read_only=True)
    try:
        step = ckpt.resolve_step(step)
        return directory, step, ckpt.read_meta(step)
    finally:
        ckpt.close()


def read_params(directory: str | Path, step: int, sharding=None) -> dict[str, Any]:
    """One checkpoint's parameters, their moving average (None unless kept) and the model's other state, as
    Orbax returns them (``pure`` makes them NNX pure dicts): ``{"params": ..., "other": ..., "ema": ...}``.
    The optimizer state, often twice the parameters' size, is not read (Orbax's partial restore of the item).
    ``sharding``: where to put the arrays (default: the first device), or a function of the saved tree (its
    arrays' metadata) to a tree of shardings (``build.Hardware.shardings``: FSDP)."""
    directory = Path(directory)
    ckpt = Checkpointer(directory, best_metric=None, read_only=True)
    try:
        try:
            tree = ckpt.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            raise ckpt.damaged(step, f"its array metadata cannot be read ({_why(e)})") from None
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        keys = [k for k in ("params", "other", "ema") if tree["state"].get(k) is not None]
        saved = {k: tree["state"][k] for k in keys}
        # (a function: each array's own sharding, from the saved tree, e.g. sharded over the mesh's fsdp axis)
        places = sharding(saved) if callable(sharding) else jax.tree.map(lambda _: sharding, saved)
        wanted = {"state": jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), saved, places)}
        try:
            with ocp.PyTreeCheckpointer() as reader:
                out = reader.restore(directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                    item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                    partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise ckpt.damaged(step, f"it could not be restored ({_why(e)})") from None
    finally:
        ckpt.close()
    state = out["state"]
    return {"params": state["params"], "other": state["other"], "ema": state.get("ema")}


def load_for_inference(path: str | Path, sharding=None) -> dict[str, Any]:
    """A checkpoint's metadata and parameters (plus the model's other state) without its optimizer state:
    ``{"config": dict, "meta": dict, "params": ..., "other": ..., "ema": ..., "step": int, "directory": Path}``.
    A checkpoint knows no models: ``vision_train.train.build.restore_model`` rebuilds one from ``config``."""
    directory, step, meta = read_meta(path)
    return {"config": meta.get("config", {}), "meta": meta, **read_params(directory, step, sharding), "step": step,
            "directory": directory}


def pure(tree):
    """Orbax returns each NNX Variable as {"value": array}; NNX's pure dicts hold the arrays themselves."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: pure(v) for k, v in tree.items()}
    return tree


def saved_tree(ckpt: Checkpointer, step: int) -> dict:
    """The tree of the arrays a checkpoint holds, as metadata (shapes, dtypes): ``{"state": {"step": ...,
    "params": ..., ...}}``, plus ``"acc"`` in one written before the train step's running sums moved into
    the loop state."""
    try:
        return dict(ckpt.manager.item_metadata(step)["state"])
    except Exception as e:  # noqa: BLE001
        raise ckpt.damaged(step, f"its array metadata cannot be read ({_why(e)})") from None
