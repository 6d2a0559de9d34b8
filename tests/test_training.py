"""The training loop in-process: sharding, determinism, compile-once, NaN handling, full eval coverage."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vision_train.data import pipeline
from vision_train.errors import ConfigError, TrainingError
from vision_train.train import steps
from vision_train.train.loop import train

from .helpers import FAST, compose

TINY_VIT = ["model=vit", "model.patch_size=2", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
            "model.mlp_dim=32", "model.dropout=0.1", "model.stochastic_depth=0.1"]
SMALL_DATA = ["data=synthetic", "data.num_examples=640", "data.image_shape=[8,8,3]", "data.val_size=100",
              "data.augment.flip=true", "data.augment.random_resized_crop=true"]


def run(tmp_path, name, overrides, model=TINY_VIT):
    cfg = compose([*FAST, *SMALL_DATA, *model, "trainer.batch_size=64", "trainer.epochs=2",
                   "trainer.log_every_steps=2", *overrides])
    summary = train(cfg, tmp_path / name)
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    return summary, rows


def curve(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """One 3-epoch run over 8 devices, shared by the compile-once test and the sharded-equals-single-device test:
    (summary, rows, train-step traces during the run, XLA compilations of the train step logged during it)."""
    compiled = []

    class Compiles(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation of jit(train_step)" in record.getMessage():
                compiled.append(record)

    handler, jax_log = Compiles(logging.WARNING), logging.getLogger("jax")
    level, before = jax_log.level, steps.TRACES["train_step"]
    jax_log.addHandler(handler)
    jax_log.setLevel(logging.WARNING)
    try:
        with jax.log_compiles(True):
            summary, rows = run(tmp_path_factory.mktemp("eight"), "r", ["hardware.num_devices=8", "trainer.epochs=3"])
    finally:
        jax_log.removeHandler(handler)
        jax_log.setLevel(level)
    return summary, rows, steps.TRACES["train_step"] - before, len(compiled)


@pytest.mark.xdist_group("eight_devices")  # (one worker: the module fixture runs once)
def test_sharded_over_8_devices_equals_single_device(tmp_path, eight_devices):
    _, one = run(tmp_path, "one", ["hardware.num_devices=1", "trainer.epochs=3"])
    _, eight, _, _ = eight_devices
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        a, b = curve(one, key), curve(eight, key)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) > 0
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=2e-4, atol=2e-4, err_msg=key)


@pytest.mark.slow  # (36 s; test_records' two identical runs stay in the default tier)
def test_same_seed_same_losses_bit_for_bit_and_other_seed_differs(tmp_path):
    _, a = run(tmp_path, "a", ["hardware.num_devices=2"])
    _, b = run(tmp_path, "b", ["hardware.num_devices=2"])
    _, c = run(tmp_path, "c", ["hardware.num_devices=2", "trainer.seed=7"])
    timing = ("images_per_sec", "perf/")  # wall-clock values (prefixes)
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith(timing)} for r in rows]  # noqa: E731
    assert drop(a) == drop(b)
    assert curve(a, "train/loss") != curve(c, "train/loss")


@pytest.mark.xdist_group("eight_devices")  # (one worker: the module fixture runs once)
def test_train_step_compiles_once_per_run(eight_devices):
    summary, rows, traces, compiles = eight_devices
    assert traces == 1, "the train step was retraced during the run"
    assert compiles == 1, "the train step was compiled more than once"
    assert summary["step"] == 3 * ((int(0.8 * 640) - 100) // 64)  # 412 training examples, last partial batch dropped
    assert curve(rows, "epoch")[-1][1] == 3.0


def _tiny_setup(num_devices, batch_size):
    """The run's wiring for a tiny CNN on 8x8x3 synthetic data: (jitted train step, eval step, state, feed,
    data, model): the same feed and step builders the assembly uses."""
    from flax import nnx

    from vision_train import models, parallel
    from vision_train.data import sources
    from vision_train.train import state as state_lib
    from vision_train.train.feeds import DeviceFeed, Normalize

    mesh = parallel.make_mesh(jax.devices("cpu")[:num_devices])
    rep = parallel.replicated(mesh)
    split = sources.make_synthetic(100, (8, 8, 3), 10, seed=0)
    ds = sources.Dataset("synthetic", train=split, val=None, test=split, class_names=tuple(map(str, range(10))),
                         mean=(0.5,) * 3, std=(0.25,) * 3)
    feed = DeviceFeed(ds, batch_size=batch_size, mesh=mesh, aug=pipeline.Augment(flip=True),
                      normalize=Normalize(1 / 255, (0.5,) * 3, (0.25,) * 3, jnp.float32), eval_splits=("test",))
    model = models.create("cnn", (8, 8, 3), 10, rngs=nnx.Rngs(params=0, dropout=1), features=(4, 8), dense_dim=16)
    tx = state_lib.make_optimizer(compose(["optimizer=adam"]).optimizer,
                                  lr_shape=state_lib.lr_schedule("constant", 1.0, 100, 0, 0.0))
    graphdef, state = state_lib.create(model, tx, seed=0)
    train_step = jax.jit(steps.make_train_step(graphdef, tx, feed.train_batch))
    eval_step = jax.jit(steps.make_eval_step(graphdef, feed.eval_batches, feed.eval_batch), out_shardings=rep)
    return train_step, eval_step, jax.device_put(state, rep), feed, split, model


def test_eval_counts_every_example_exactly_once():
    # 100 examples, batch 48 over 8 devices: 3 batches, the last one 4/48 full.
    from vision_train.train import evaluation

    _, eval_step, state, feed, split, model = _tiny_setup(8, 48)
    out = evaluation.run_split(eval_step, state.params, state.other, feed, "test", [str(i) for i in range(10)])
    assert sum(out.confusion.ravel()) == 100 and len(out.preds) == 100
    logits = model(pipeline.normalize(jnp.asarray(split.images), 1 / 255, (0.5,) * 3, (0.25,) * 3, jnp.float32), train=False)
    reference = np.asarray(jnp.argmax(logits, -1))
    assert out.scalars["test/acc"] == np.sum(reference == split.labels) / 100
    np.testing.assert_array_equal(out.preds, reference)


def test_batch_work_is_split_across_devices_not_replicated():
    """XLA's per-device FLOP count of the train step on 8 devices is ~1/8 of the single-device one."""
    flops = {}
    for n in (1, 8):
        train_step, _, state, feed, _, _ = _tiny_setup(n, 64)
        sums = jax.device_put(steps.new_train_sums(), feed.sharding)
        cost = train_step.lower(state, sums, *feed.train_args(0)).compile().cost_analysis()
        flops[n] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert flops[8] < flops[1] / 4, flops


@pytest.mark.slow  # (38 s under load; test_accuracy's CNN on digits reaching 0.97 test accuracy checks that training learns)
def test_training_learns(tmp_path):
    summary, rows = run(tmp_path, "r", ["trainer.epochs=4", "optimizer.lr=3e-3"],
                        model=["model=cnn", "model.features=[8,16]", "model.dense_dim=32"])
    losses = [v for _, v in curve(rows, "train/loss")]
    assert losses[-1] < 0.9 * losses[0]
    assert summary["test/acc"] > 0.3  # 10 classes: chance is 0.1


@pytest.mark.slow  # (30 s under load; test_tracking's failed run raises this TrainingError, with its message and metrics.jsonl
def test_nan_loss_stops_naming_the_step_and_keeps_the_log(tmp_path):  # kept, in-process; test_cli's on the command line)
    with pytest.raises(TrainingError, match=r"loss became NaN/inf at step 2 \(epoch 1\)"):
        run(tmp_path, "r", ["optimizer=sgd", "optimizer.lr=1e30", "optimizer.schedule=constant"])
    assert (tmp_path / "r" / "metrics.jsonl").exists()


def test_batch_not_divisible_by_devices_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.batch_size=60: .* 8 devices; use trainer.batch_size=64 or 56"):
        run(tmp_path, "r", ["hardware.num_devices=8", "trainer.batch_size=60"])


def test_more_classes_in_data_than_head_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.num_classes=5: synthetic has 10 classes"):
        run(tmp_path, "r", ["model.num_classes=5"])


@pytest.mark.parametrize("overrides", [
    ["optimizer=adam", "optimizer.weight_decay=0.01"],
    ["optimizer=adamw", "optimizer.grad_clip_norm=0.5", "optimizer.min_lr=1e-4", "optimizer.warmup_epochs=2"],
    ["optimizer=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9", "optimizer.nesterov=true",
     "optimizer.weight_decay=0.001", "optimizer.schedule=cosine"],
], ids=["adam-l2", "adamw-clip-warmup-cosine", "sgd-nesterov-cosine"])
def test_optimizer_with_runtime_hyperparameters_matches_optax(overrides):
    """The learning rate, weight decay and clip norm live in the optimizer state; the updates are optax's own."""
    import optax

    from vision_train.train import state as state_lib

    o = compose(overrides).optimizer
    total, warmup = 40, 2 * 10 if o.warmup_epochs else 0
    tx = state_lib.make_optimizer(o, lr_shape=state_lib.lr_schedule(o.schedule, 1.0, total, warmup, o.min_lr / o.lr))
    schedule = state_lib.lr_schedule(o.schedule, o.lr, total, warmup, o.min_lr)
    parts = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm else []
    if o.name == "adamw":
        parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    elif o.name == "adam":
        parts += [optax.add_decayed_weights(o.weight_decay), optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps)]
    else:
        parts += [optax.add_decayed_weights(o.weight_decay), optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov)]
    ref = optax.chain(*parts)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
    a, b = params, params
    sa, sb = tx.init(a), ref.init(b)
    for _ in range(total):
        g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
        ua, sa = tx.update(g, sa, a)
        ub, sb = ref.update(g, sb, b)
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    for k in params:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-7)
    assert float(sa.hyperparams["learning_rate"]) == pytest.approx(o.lr)


def test_a_resumed_run_trains_with_its_own_learning_rate(tmp_path):
    """The optimizer's numbers are in the checkpointed state; a resumed (or warm-started) run uses the config's."""
    from vision_train import checkpoint as ckpt_lib

    tiny = [*FAST, "model=cnn", "model.features=[8,16]", "model.dense_dim=32", "data=digits", "trainer.batch_size=64"]
    train(compose([*tiny, "trainer.epochs=1", "optimizer.lr=1e-3"]), tmp_path / "a")
    for name, lr in (("b", "1e-3"), ("c", "1e-2")):
        train(compose([*tiny, "trainer.epochs=2", f"optimizer.lr={lr}", f"trainer.resume={tmp_path / 'a'}"]),
              tmp_path / name)
    b, c = (ckpt_lib.load_for_inference(tmp_path / n)["params"] for n in ("b", "c"))
    assert any(not np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(c)))
