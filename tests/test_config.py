"""Every preset composes against the schema; impossible values are refused naming key, value and fix."""

import dataclasses
import json
import os

import pytest

from vision_train.config import BEST_METRICS, METRICS, OBJECTIVES, ConfigError, UnknownKey, to_dict
from vision_train.train.loop import train

from .helpers import CONF, DIGITS, FAST, compose


def options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "hardware", "trainer", "logger", "experiment"])
def test_every_preset_composes_and_validates(group):
    names = options(group)
    assert names, f"conf/{group} is empty"
    for name in names:
        cfg = compose([f"{group}={name}"])
        assert cfg.model.arch in ("mlp", "cnn", "mixer", "vit")


def test_experiment_presets_carry_the_seed_recipes():
    vit = compose(["experiment=seed004_vit_cifar10"])
    assert (vit.model.arch, vit.model.hidden_size, vit.model.num_layers, vit.model.num_heads, vit.model.mlp_dim,
            vit.model.patch_size, vit.model.classifier, vit.model.dropout) == ("vit", 128, 6, 8, 256, 4, "token", 0.1)
    assert (vit.optimizer.name, vit.optimizer.lr, vit.trainer.batch_size, vit.trainer.epochs) == ("adam", 1e-4, 128, 100)
    assert (vit.data.name, vit.data.val_size, vit.data.split_seed) == ("cifar10", 5000, 42)
    assert vit.data.augment.flip and vit.data.augment.random_resized_crop
    assert list(vit.data.augment.crop_scale) == [0.8, 1.0] and list(vit.data.augment.crop_ratio) == [0.9, 1.1]

    small = compose(["experiment=seed001_mixer_small_cifar10"])
    assert (small.model.hidden_dim, small.model.num_blocks, small.model.tokens_mlp_dim, small.model.channels_mlp_dim) \
        == (64, 2, 32, 256)
    assert small.trainer.batch_size == 4 and small.data.val_size == 0 and list(small.data.mean) == [0.5] * 3

    toy = compose(["experiment=seed003_mlp_toy"])
    assert (toy.model.arch, toy.model.hidden_layers, toy.model.hidden_dim, toy.optimizer.lr, toy.trainer.batch_size) \
        == ("mlp", 1, 10, 0.01, 32)


def test_user_facing_names_are_stable():
    cfg = compose(["trainer.epochs=3", "trainer.batch_size=64", "trainer.seed=1", "optimizer.lr=0.1",
                   "model.patch_size=8", "data.root=/x", "hardware.num_devices=2", "hardware.precision=bfloat16",
                   "logger.mode=disabled"])
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.seed, cfg.optimizer.lr, cfg.model.patch_size,
            cfg.data.root, cfg.hardware.num_devices, cfg.hardware.precision, cfg.logger.mode) == \
        (3, 64, 1, 0.1, 8, "/x", 2, "bfloat16", "disabled")


def test_run_config_is_frozen_and_plain():
    cfg = compose()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer.epochs = 5
    d = to_dict(cfg)
    assert d["model"]["arch"] == "vit" and isinstance(d["data"]["augment"]["crop_scale"], list)


@pytest.mark.parametrize("override,key,fix", [
    ("trainer.batch_size=0", "trainer.batch_size", "must be > 0"),
    ("optimizer.lr=-0.001", "optimizer.lr", "must be > 0"),
    ("trainer.epochs=0", "trainer.epochs", "must be > 0"),
    ("model.num_heads=3", "model.num_heads", "must divide model.hidden_size=128"),
    ("optimizer.name=lamb", "optimizer.name", "choose one of adam, adamw, sgd"),
    ("hardware.precision=fp8", "hardware.precision", "choose one of float32, bfloat16"),
    ("data.augment.crop_scale=[0.9,0.5]", "data.augment.crop_scale", "0 < low <= high"),
    ("logger.mode=loud", "logger.mode", "choose one of auto, online, offline, disabled"),
    ("model=cnn model.features=[]", "model.features", "all > 0"),
    ("optimizer.b2=1.0", "optimizer.b2", "must be in [0, 1)"),
    ("optimizer.eps=0", "optimizer.eps", "must be > 0"),
    ("optimizer.min_lr=1.0", "optimizer.min_lr", "must be <= optimizer.lr=0.001"),
    ("optimizer=sgd optimizer.momentum=0", "optimizer.nesterov", "needs optimizer.momentum > 0"),
    ("data=toy data.num_examples=3", "data.num_examples", "must be >= 10"),
    # keys that name a metric name one the run reports
    ("trainer.best_metric=bogus", "trainer.best_metric", "choose one of auto, train/loss, train/acc, val/loss, val/acc"),
    ("trainer.best_metric=test/acc", "trainer.best_metric", "(the metrics of the epoch line)"),
    ("data=toy trainer.best_metric=val/loss", "trainer.best_metric", "data.val_size=0 leaves toy no validation split"),
    ("trainer.best_metric=val/loss trainer.best_mode=max", "trainer.best_mode", "set trainer.best_mode=min"),
    ("trainer.best_metric=train/acc trainer.best_mode=min", "trainer.best_mode", "set trainer.best_mode=max"),
    ("trainer.objective=bogus", "trainer.objective", "choose one of auto, val/loss, val/acc, best/val/acc"),
    ("data=toy trainer.objective=val/acc", "trainer.objective", "data.val_size=0 leaves toy no validation split"),
    ("data=toy trainer.objective=best/val/acc", "trainer.objective", "use trainer.objective=test/loss, test/acc"),
])
def test_impossible_values_name_key_value_and_fix(override, key, fix):
    with pytest.raises(ConfigError) as e:
        compose(override.split())
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}=") and fix in str(e.value)


@pytest.mark.parametrize("overrides,key,valid", [
    (["+trainer.epochz=3"], "trainer.epochz", "epochs"),  # Hydra's own message suggests the +
    (["model=cnn", "+model.patch_size=4"], "model.patch_size", "dense_dim"),  # the chosen arch's schema
    (["+model.features=[8]"], "model.features", "patch_size"),  # (model=vit: a CNN's key)
    (["+data.augment.flipp=true"], "data.augment.flipp", "flip"),
    (["+logger.finish_timeout=5"], "logger.finish_timeout", "project"),
    (["+seed=1"], "seed", "trainer"),
])
def test_added_keys_the_schema_does_not_have_are_refused(overrides, key, valid):
    with pytest.raises(UnknownKey) as e:
        compose(overrides)
    assert e.value.key == key and valid in e.value.valid
    assert str(e.value).startswith(f"{key}: no such key (Key '{key.rpartition('.')[2]}' not in ")




def test_the_best_checkpoints_metric_and_direction_resolve_from_one_list():
    assert set(OBJECTIVES) | set(BEST_METRICS) <= set(METRICS)  # both keys check against the same metrics
    for overrides, metric, mode in (([], "val/acc", "max"), (["data=toy"], None, "auto"),
                                    (["trainer.best_metric=val/loss"], "val/loss", "min"),
                                    (["data=toy", "trainer.best_metric=train/loss"], "train/loss", "min"),
                                    (["trainer.best_metric=null"], None, "auto")):
        t = compose(overrides).trainer
        assert (t.best_metric, t.best_mode) == (metric, mode), overrides


def test_best_metric_val_loss_keeps_the_checkpoint_with_the_lowest_val_loss(tmp_path):
    """It used to keep the highest (best_mode stayed max), and a bogus metric kept no best at all."""
    train(compose([*FAST, *DIGITS, "trainer.epochs=4", "optimizer.lr=0.01", "trainer.keep_checkpoints=1",
                   "trainer.best_metric=val/loss"]), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    kept = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
    assert len(val) == 4
    assert kept == sorted({max(val), min(val, key=val.get)})  # the last, and the best: the lowest val/loss
