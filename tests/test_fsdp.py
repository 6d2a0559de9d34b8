"""FSDP (hardware.fsdp): the data x fsdp mesh, big_vision's sharding rule and its overrides, the same records as
data parallelism, checkpoints across meshes, and the memory each device holds (memory/* in every run)."""

import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from vision_train import models, parallel
from vision_train.errors import ConfigError
from vision_train.train import steps
from vision_train.train import state as state_lib
from vision_train.train.loop import train

from .helpers import FAST, Stopped, compose, stop_at

# Tiny models whose weight matrices reach parallel.FSDP_MIN_SIZE (4,096 elements), so the default rule shards them;
# the CNN's do not: its runs shard every array by a rule instead (hardware.sharding_rules).
MODELS = {
    "vit": ["model=vit", "model.patch_size=2", "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2",
            "model.mlp_dim=128", "model.dropout=0.1", "model.stochastic_depth=0.1"],
    "mixer": ["model=mixer", "model.patch_size=2", "model.num_blocks=1", "model.hidden_dim=64",
              "model.tokens_mlp_dim=8", "model.channels_mlp_dim=128"],
    "cnn": ["model=cnn", "model.features=[8,16]", "model.dense_dim=32", "+hardware.sharding_rules={.*:fsdp}"],
}
DATA = ["data=synthetic", "data.num_examples=400", "data.image_shape=[8,8,3]", "data.val_size=64",
        "data.augment.flip=true"]
TIMING = ("images_per_sec", "perf/")  # wall-clock values


def run(tmp_path, name, overrides, model="vit", hooks=()):
    cfg = compose([*FAST, *DATA, *MODELS[model], "trainer.batch_size=32", "trainer.epochs=1",
                   "trainer.log_every_steps=2", "hardware.num_devices=8", *overrides])
    summary = train(cfg, tmp_path / name, hooks=list(hooks))
    return summary, rows(tmp_path / name)


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)}
            for line in open(run_dir / "metrics.jsonl")]


def assert_same_records(a, b, rtol=1e-4):
    """Every logged value of ``b`` equals ``a``'s within ``rtol`` (the all-reduce and gather order differ)."""
    assert [sorted(r) for r in a] == [sorted(r) for r in b] and len(a) > 2
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            assert rb[key] == pytest.approx(value, rel=rtol, abs=1e-6), (ra["step"], key)


# ----------------------------------------------------------------------------------- the rule, fast
@pytest.mark.fast
def test_fsdp_must_divide_the_devices_in_one_line():
    with pytest.raises(ConfigError) as e:
        parallel.make_mesh(jax.devices()[:8], 3)
    assert e.value.key == "hardware.fsdp" and "1, 2, 4, 8" in str(e.value) and "\n" not in str(e.value)
    mesh = parallel.make_mesh(jax.devices()[:8], 4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ConfigError):
        compose(["hardware.fsdp=0"])


@pytest.mark.fast
def test_big_vision_rule_largest_divisible_dimension_small_arrays_replicated():
    P = jax.sharding.PartitionSpec
    assert parallel.fsdp_spec((384, 1536), 8) == P(None, "fsdp")
    assert parallel.fsdp_spec((1536, 384), 8) == P("fsdp", None)
    assert parallel.fsdp_spec((1000, 384), 16) == P(None, "fsdp")  # 1000 % 16 != 0: the next largest
    assert parallel.fsdp_spec((197, 385), 8) == P()  # none divides
    assert parallel.fsdp_spec((384,), 8) == P()  # under FSDP_MIN_SIZE elements
    assert parallel.fsdp_spec((16, 16, 3, 384), 8) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((384, 1536), 1) == P()


@pytest.mark.fast
def test_rules_override_and_the_optimizer_state_and_average_follow_their_parameter():
    P = jax.sharding.PartitionSpec
    mesh = parallel.make_mesh(jax.devices()[:8], 4)
    cfg = compose(["model=vit", "model.hidden_size=64", "model.mlp_dim=128", "model.num_layers=2",
                   "model.num_heads=2", "model.patch_size=2"])

    def init():
        model = models.create(cfg.model, (8, 8, 3), 10, rngs=nnx.Rngs(params=0, dropout=1))
        tx = state_lib.make_optimizer(cfg.optimizer, lr_shape=state_lib.lr_schedule("constant", 1.0, 10, 0, 0.0))
        return state_lib.create(model, tx, 0, ema=True)

    _, abstract = nnx.eval_shape(init)
    rules = {r"blocks\.0\..*kernel": "replicate", r"head\.kernel": ["fsdp", None]}  # (head: 64 x 10)
    sh = parallel.state_shardings(abstract, abstract.params, mesh, rules)
    paths = {parallel.dotted_path(kp): s.spec for kp, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    kernels = [p for p in paths if p.startswith("params.blocks.1.") and p.endswith("kernel")]
    assert kernels and all("fsdp" in paths[p] for p in kernels), {p: paths[p] for p in kernels}  # the default rule
    assert all(paths[p] == P() for p in paths if p.startswith("params.blocks.0.") and p.endswith("kernel"))
    assert paths["params.head.kernel"] == P("fsdp", None)
    for p, spec in paths.items():  # the moving average and Adam's moments: as their parameter
        if p.startswith("params."):
            assert paths["ema." + p[len("params."):]] == spec, p
            moments = [q for q in paths if q.startswith("opt_state.") and q.endswith(".mu." + p[len("params."):])]
            assert moments and all(paths[q] == spec for q in moments), p
    assert paths["step"] == P() and paths["rng"] == P()
    for bad, why in (({"nothing_like_this": "fsdp"}, "matches no parameter"),
                     ({r"head\.kernel": [None, "fsdp", None]}, "has 3 entries"),
                     ({r"head\.kernel": [None, "fsdp"]}, "do not divide"),  # 64 x 10: 10 % 4
                     ({r"head\.kernel": ["model", None]}, "names no mesh axis")):
        with pytest.raises(ConfigError) as e:
            parallel.state_shardings(abstract, abstract.params, mesh, bad)
        assert why in str(e.value) and e.value.key.startswith("hardware.sharding_rules"), str(e.value)


@pytest.mark.fast
def test_vit_s_fsdp8_holds_an_eighth_of_the_parameters_and_optimizer_state_per_device():
    """From shapes and shardings alone (nothing allocated): parameters + Adam state of ViT-S/16 on 224x224, 1000
    classes, per device with fsdp=8 at most 1.05/8 of replicated (the small arrays stay replicated)."""
    cfg = compose(["model=vit_s"])

    def init():
        model = models.create(cfg.model, (224, 224, 3), 1000, rngs=nnx.Rngs(params=0, dropout=1))
        tx = state_lib.make_optimizer(cfg.optimizer, lr_shape=state_lib.lr_schedule("constant", 1.0, 10, 0, 0.0))
        return state_lib.create(model, tx, 0)

    _, abstract = nnx.eval_shape(init)
    per_device = {}
    for fsdp in (1, 8):
        mesh = parallel.make_mesh(jax.devices()[:8], fsdp)
        sh = parallel.state_shardings(abstract, abstract.params, mesh)
        placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sh)
        per_device[fsdp] = parallel.bytes_per_device(placed.params) + parallel.bytes_per_device(placed.opt_state)
    assert per_device[1] > 2 * 22e6 * 4  # (params and both Adam moments, float32: about 88 + 176 MB)
    assert per_device[8] <= 1.05 / 8 * per_device[1], per_device[8] / per_device[1] * 8


# ------------------------------------------------------------------------------ training, default tier
def test_fsdp4_equals_data_parallelism_with_ema_and_accumulation_and_compiles_once(tmp_path, caplog):
    extra = ["trainer.ema_decay=0.9", "trainer.grad_accum_steps=2"]
    dp, a = run(tmp_path, "dp", extra)
    before = steps.TRACES["train_step"]
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        fsdp, b = run(tmp_path, "fsdp", [*extra, "hardware.fsdp=4"])
    assert steps.TRACES["train_step"] - before == 1, "the train step was retraced"
    compiles = [r for r in caplog.records if "Finished XLA compilation of jit(train_step)" in r.getMessage()]
    assert len(compiles) == 1, "the train step was compiled more than once"
    assert_same_records(a, b)
    assert any(k.startswith("val_ema/") for r in b for k in r)
    # memory/* in the summary, from the arrays' shards: the weight matrices are a quarter on each device.
    for key in ("memory/param_bytes_per_device", "memory/opt_state_bytes_per_device", "memory/ema_bytes_per_device"):
        assert 0 < fsdp[key] < 0.5 * dp[key], key
    assert fsdp["memory/step_temp_bytes_per_device"] > 0  # (XLA's CPU backend reports it)
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["memory/param_bytes_per_device"] == \
        fsdp["memory/param_bytes_per_device"]


def test_an_fsdp4_checkpoint_resumes_on_one_device_to_the_same_records(tmp_path):
    """Written with fsdp=4 on 8 devices, resumed on 1 device (fsdp=1): the records of the uninterrupted run."""
    job = ["trainer.epochs=2", "trainer.checkpoint_every_steps=5", "hardware.fsdp=4"]
    _, full = run(tmp_path, "full", job)
    with pytest.raises(Stopped):
        run(tmp_path, "cut", job, hooks=[stop_at(5)])
    _, resumed = run(tmp_path, "cut", ["trainer.epochs=2", "trainer.checkpoint_every_steps=5",
                                       "hardware.num_devices=1"])
    assert_same_records(full, resumed)

    # evaluate / predict's reading of a checkpoint: its parameters placed by the FSDP rule of the mesh at hand.
    from vision_train.train import build

    hw = build.hardware(compose([*FAST, "hardware.num_devices=8", "hardware.fsdp=8"]).hardware)
    trained = build.restore_model(build.read_checkpoint(tmp_path / "full"), hw.shardings)
    specs = [x.sharding.spec for x in jax.tree.leaves(trained.params)]
    assert any("fsdp" in s for s in specs) and any(s == jax.sharding.PartitionSpec() for s in specs)


# --------------------------------------------------------------------------------- the matrix, slow
@pytest.mark.slow  # (about 3 minutes on 2 cores: the default tier has the ViT at fsdp=4)
@pytest.mark.parametrize("model", ["vit", "mixer", "cnn"])
def test_fsdp_2_4_8_equal_data_parallelism(tmp_path, model):
    dp, a = run(tmp_path, "dp", [], model=model)
    for fsdp in (2, 4, 8):
        s, b = run(tmp_path, f"fsdp{fsdp}", [f"hardware.fsdp={fsdp}"], model=model)
        assert_same_records(a, b)
        assert s["memory/param_bytes_per_device"] < dp["memory/param_bytes_per_device"]


@pytest.mark.slow
def test_fsdp_with_a_streamed_feed_equals_data_parallelism(tmp_path):
    streamed = ["data.stream=true", "data.workers=0"]
    _, a = run(tmp_path, "dp", streamed)
    _, b = run(tmp_path, "fsdp", [*streamed, "hardware.fsdp=2"])
    assert_same_records(a, b)


@pytest.mark.slow
def test_an_fsdp4_checkpoint_resumes_with_fsdp2_to_the_same_records(tmp_path):
    job = ["trainer.epochs=2", "trainer.checkpoint_every_steps=5"]
    _, full = run(tmp_path, "full", [*job, "hardware.fsdp=4"])
    with pytest.raises(Stopped):
        run(tmp_path, "cut", [*job, "hardware.fsdp=4"], hooks=[stop_at(5)])
    _, resumed = run(tmp_path, "cut", [*job, "hardware.fsdp=2"])
    assert_same_records(full, resumed)
    np.testing.assert_equal(len(full), len(resumed))


def test_the_benchmark_prints_data_parallelism_and_fsdp_side_by_side(tmp_path):
    """benchmarks/fsdp.py end to end, as a user runs it (the seed MLP: seconds)."""
    import subprocess
    import sys

    from .conftest import FAST_COMPILE, REPO

    out = tmp_path / "fsdp.json"
    r = subprocess.run([sys.executable, "benchmarks/fsdp.py", "--models", "mlp", "--fsdp", "1,2", "--image-size", "32",
                        "--batch-size", "8", "--num-classes", "10", "--steps", "1", "--repeats", "1", "--json", str(out)],
                       cwd=REPO, env={**__import__("os").environ, "XLA_FLAGS": FAST_COMPILE}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "data=8 x fsdp=1" in r.stdout and "data=4 x fsdp=2" in r.stdout and "state vs DP" in r.stdout
    results = json.loads(out.read_text())["results"]
    assert [x["fsdp"] for x in results] == [1, 2]
    assert results[1]["param_bytes"] < results[0]["param_bytes"]  # (32x32x3 inputs x 10 units: sharded)


@pytest.mark.slow  # (two fine-tunes: 1-4 minutes on 2 cores, by load)
def test_fine_tuning_from_a_timm_file_with_fsdp_equals_data_parallelism(tmp_path):
    """model.init_from with hardware.fsdp=4: the file's weights go into the sharded arrays (each where the run's
    array is), and the records equal data parallelism's."""
    from .test_finetune import timm_vit_file

    timm_vit_file(tmp_path / "vit.safetensors", img=8, patch=4, in_chans=3, dim=64, depth=2, heads=2, classes=10,
                  scale=0.05)
    vit = ["model=vit", "model.patch_size=4", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
           "model.mlp_dim=256", "model.dropout=0.0", "model.gelu=exact", "model.qkv_bias=true",
           "model.layer_norm_eps=1e-6", "model.classifier=token", f"model.init_from={tmp_path / 'vit.safetensors'}"]
    MODELS["timm_vit"] = vit
    try:
        _, a = run(tmp_path, "dp", [], model="timm_vit")
        s, b = run(tmp_path, "fsdp", ["hardware.fsdp=4"], model="timm_vit")
    finally:
        del MODELS["timm_vit"]
    assert_same_records(a, b)
    assert s["memory/param_bytes_per_device"] < 0.5 * 4 * s["parameters"]
