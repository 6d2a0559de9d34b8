"""Every preset composes against the schema; impossible values are refused naming key, value and fix."""

import dataclasses
import json
import os
import typing

import pytest

from vision_train.config import (ARCHITECTURES, BEST_METRICS, METRICS, OBJECTIVES, Config, ConfigError, UnknownKey,
                                 to_dict, validate)
from vision_train.train.loop import train

from .conftest import run_cli
from .helpers import CONF, DIGITS, FAST, compose


def options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "hardware", "trainer", "logger", "experiment"])
def test_every_preset_composes_and_validates(group):
    names = options(group)
    assert names, f"conf/{group} is empty"
    for name in names:
        cfg = compose([f"{group}={name}"])
        assert cfg.model.arch in ARCHITECTURES


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


@pytest.mark.fast
def test_user_facing_names_are_stable():
    cfg = compose(["trainer.epochs=3", "trainer.batch_size=64", "trainer.seed=1", "optimizer.lr=0.1",
                   "model.patch_size=8", "data.root=/x", "hardware.num_devices=2", "hardware.precision=bfloat16",
                   "logger.mode=disabled"])
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.seed, cfg.optimizer.lr, cfg.model.patch_size,
            cfg.data.root, cfg.hardware.num_devices, cfg.hardware.precision, cfg.logger.mode) == \
        (3, 64, 1, 0.1, 8, "/x", 2, "bfloat16", "disabled")


@pytest.mark.fast
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
    ("optimizer.name=lars", "optimizer.name", "choose one of adam, adamw, sgd, lamb"),
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
    ("data=toy trainer.best_metric=val/loss", "trainer.best_metric", "toy has no validation split; "),
    ("trainer.best_metric=val/loss trainer.best_mode=max", "trainer.best_mode", "set trainer.best_mode=min"),
    ("trainer.best_metric=train/acc trainer.best_mode=min", "trainer.best_mode", "set trainer.best_mode=max"),
    ("trainer.objective=bogus", "trainer.objective", "choose one of auto, none, val/loss, val/acc, best/val/acc"),
    ("data=toy trainer.objective=val/acc", "trainer.objective", "toy has no validation split; "),
    ("data=toy trainer.objective=best/val/acc", "trainer.objective", "use trainer.objective=test/loss, test/acc"),
])
@pytest.mark.fast
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
@pytest.mark.fast
def test_added_keys_the_schema_does_not_have_are_refused(overrides, key, valid):
    with pytest.raises(UnknownKey) as e:
        compose(overrides)
    assert e.value.key == key and valid in e.value.valid
    assert str(e.value).startswith(f"{key}: no such key (Key '{key.rpartition('.')[2]}' not in ")




def _float_keys(schema, prefix=""):
    """(key, kind) of every float-typed field of a schema and of its groups: kind float, list or dict."""
    for f in dataclasses.fields(schema):
        hint, key = typing.get_type_hints(schema)[f.name], f"{prefix}{f.name}"
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
        if dataclasses.is_dataclass(inner):
            yield from _float_keys(inner, f"{key}.")
        elif inner is float:
            yield key, "float"
        elif typing.get_origin(inner) is list and typing.get_args(inner) == (float,):
            yield key, "list"
        elif typing.get_origin(inner) is dict and typing.get_args(inner)[1] is float:
            yield key, "dict"


def _config_with(arch, key, value):
    cfg = Config(model=ARCHITECTURES[arch]())
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, value)
    return cfg


@pytest.mark.fast
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_float_key_refuses_nan_and_inf_naming_the_key(arch, bad):
    """optimizer.lr=inf was accepted (the run stopped at step 2, after compiling); nan passes range checks."""
    keys = list(_float_keys(Config)) + [(f"model.{k}", kind) for k, kind in _float_keys(ARCHITECTURES[arch])]
    assert {("optimizer.lr", "float"), ("data.mean", "list"), ("optimizer.lr_mults", "dict")} <= set(keys)
    assert arch in ("mlp", "cnn") or any(k.startswith("model.") for k, _ in keys)  # the model's own keys are walked
    for key, kind in keys:
        value = {"float": bad, "list": [0.5, bad], "dict": {".*": bad}}[kind]
        with pytest.raises(ConfigError) as e:
            validate(_config_with(arch, key, value))
        named = f"{key}[{'.*'!r}]" if kind == "dict" else key
        assert e.value.key == named and e.value.fix == "must be a finite number", (key, str(e.value))
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{named}=")


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=inf", "optimizer.lr"), ("optimizer.lr=nan", "optimizer.lr"),
    ("logger.init_timeout_s=inf", "logger.init_timeout_s"), ("model.layer_norm_eps=inf", "model.layer_norm_eps"),
    ("data.augment.crop_ratio=[0.5,inf]", "data.augment.crop_ratio"),
    ("+optimizer.lr_mults={head:inf}", "optimizer.lr_mults['head']"),
])
@pytest.mark.fast
def test_nan_and_inf_overrides_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        compose(override.split())
    assert e.value.key == key and str(e.value).startswith(f"{key}=") and "must be a finite number" in str(e.value)


def test_cli_refuses_an_infinite_learning_rate_in_one_line(tmp_path):
    r = run_cli(["data=toy", "model=mlp", "optimizer.lr=inf", "logger.mode=disabled", "hardware=cpu"], cwd=tmp_path,
                timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "optimizer.lr=inf" in lines[0] and "must be a finite number" in lines[0], lines


@pytest.mark.fast
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
