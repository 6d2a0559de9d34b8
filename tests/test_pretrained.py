"""Pretrained weights (models/pretrained.py): timm and big_vision files load onto our ViT and Mixer and compute
what their own code computes; what does not fit is one line naming the key and the fix."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from vision_train import models
from vision_train.data.sources import import_torchvision
from vision_train.errors import ConfigError
from vision_train.models import MixerConfig, ViTConfig, pretrained

from .conftest import run_cli
from .helpers import FAST, Stopped, compose, stop_at

import_torchvision()  # (before timm: PyPI torchvision beside CPU torch)
import timm
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer

SCALE = 0.3  # weights this large make exact and tanh GELU differ by 2e-4 to 1e-3 in the logits
IMG, PATCH, DIM, DEPTH, HEADS = 32, 8, 32, 2, 2
# Our configs of the timm models below: timm's exact GELU, eps 1e-6.
VIT = ViTConfig(patch_size=PATCH, hidden_size=DIM, num_layers=DEPTH, num_heads=HEADS, mlp_dim=4 * DIM, dropout=0.0,
                gelu="exact")
MIXER = MixerConfig(patch_size=PATCH, num_blocks=DEPTH, hidden_dim=DIM, tokens_mlp_dim=16, channels_mlp_dim=64,
                    gelu="exact")


def perturbed(module: torch.nn.Module, seed=0) -> torch.nn.Module:
    """Every parameter moved off its initial value (zero heads, unit LayerNorms, zero biases all move), so
    no output is trivially uniform and a parameter loaded into the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * SCALE)
    return module.eval()


def timm_vit(**kw):
    args = {"img_size": IMG, "patch_size": PATCH, "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS,
            "num_classes": 10}
    return perturbed(VisionTransformer(**{**args, **kw}))


def timm_mixer(**kw):
    args = {"img_size": IMG, "patch_size": PATCH, "num_blocks": DEPTH, "embed_dim": DIM, "mlp_ratio": (0.5, 2.0),
            "num_classes": 10}
    return perturbed(MlpMixer(**{**args, **kw}))


def batch(n=4, size=IMG, seed=1):
    """Normalised images, NHWC for us and NCHW for timm (the same numbers)."""
    x = np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def ours(cfg, pre, shape=(IMG, IMG, 3), num_classes=10):
    model = nnx.eval_shape(lambda: models.create(cfg, shape, num_classes, rngs=nnx.Rngs(0), dtype=jnp.float32))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)  # (shapes only: every leaf is loaded)
    rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) if hasattr(s, "shape") else s, rest)
    params = pretrained.merge(params, pre)
    return jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x, train=False)), params


def save(module, path):
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return str(path)


def logits_match(cfg, module, path, shape=(IMG, IMG, 3)):
    pre = pretrained.load(str(path), cfg, input_shape=shape, num_classes=10)
    f, params = ours(cfg, pre, shape)
    x, xt = batch(size=shape[0])
    with torch.no_grad():
        want = module(xt).numpy()
    got = np.asarray(f(params, x))
    assert np.abs(want).max() > 0.1 and np.std(want, axis=0).mean() > 0.01  # (not trivially uniform)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    return pre


# ------------------------------------------------------------------------------------------------ exactness
def test_timm_vit_with_class_token_computes_timms_logits(tmp_path):
    module = timm_vit()
    pre = logits_match(VIT, module, save(module, tmp_path / "vit.safetensors"))
    assert pre.info["format"] == "timm ViT (safetensors)" and pre.info["head"] == "loaded"
    assert pre.info["posemb"] == "as saved" and len(pre.info["sha256"]) == 64


def test_timm_vit_with_average_pooling_computes_timms_logits(tmp_path):
    """timm's global_pool='avg' normalises after pooling (fc_norm); without a class token."""
    module = timm_vit(global_pool="avg", class_token=False)
    cfg = dataclasses.replace(VIT, classifier="gap", fc_norm=True)
    logits_match(cfg, module, save(module, tmp_path / "vit_gap.safetensors"))


def test_timm_vit_without_qkv_bias_from_a_torch_bin(tmp_path):
    module = timm_vit(qkv_bias=False)
    torch.save(module.state_dict(), tmp_path / "pytorch_model.bin")
    pre = logits_match(dataclasses.replace(VIT, qkv_bias=False), module, tmp_path / "pytorch_model.bin")
    assert pre.info["format"] == "timm ViT (torch)"


def test_a_bfloat16_file_loads_as_float32(tmp_path):
    module = timm_vit()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()},
              str(tmp_path / "bf16.safetensors"))
    pre = pretrained.load(str(tmp_path / "bf16.safetensors"), VIT, input_shape=(IMG, IMG, 3), num_classes=10)
    want = module.blocks[1].mlp.fc2.weight.detach().to(torch.bfloat16).float().numpy().T
    got = pre.params["blocks"][1]["mlp"]["fc2"]["kernel"]
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_timm_mixer_computes_timms_logits(tmp_path):
    module = timm_mixer()
    pre = logits_match(MIXER, module, save(module, tmp_path / "mixer.safetensors"))
    assert pre.info["format"] == "timm Mixer (safetensors)"


def test_timm_vit_with_layer_scale_computes_timms_logits(tmp_path):
    """timm's init_values (CaiT, DeiT III): blocks.<i>.ls1.gamma / ls2.gamma load onto model.layer_scale's gammas
    (any value > 0: the file's replace it); a model without LayerScale is told to turn it on, and back."""
    module = timm_vit(init_values=1e-5)
    path = save(module, tmp_path / "vit_ls.safetensors")
    logits_match(dataclasses.replace(VIT, layer_scale=1e-5), module, path)
    with pytest.raises(ConfigError) as e:
        pretrained.load(path, VIT, input_shape=(IMG, IMG, 3), num_classes=10)
    assert "set model.layer_scale to any value > 0" in str(e.value)
    plain = save(timm_vit(), tmp_path / "vit.safetensors")
    with pytest.raises(ConfigError) as e:
        pretrained.load(plain, dataclasses.replace(VIT, layer_scale=1e-5), input_shape=(IMG, IMG, 3), num_classes=10)
    assert "set model.layer_scale=0" in str(e.value)


# ------------------------------------------------------------------------------- big_vision / vision_transformer
def to_big_vision_vit(module, *, old=False, scanned=False) -> dict[str, np.ndarray]:
    """timm's ViT weights in big_vision's layout (names and shapes of big_vision/models/vit.py), or ``old``:
    vision_transformer's (vit_jax/models_vit.py: MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3, the
    class token's position embedding inside Transformer/posembed_input). Flax kernels are (in, out)."""
    sd = {k: v.numpy() for k, v in module.state_dict().items()}
    d, h = DIM, HEADS
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"], "head/kernel": sd["head.weight"].T,
         "head/bias": sd["head.bias"]}
    pe, cls = sd["pos_embed"], sd["cls_token"]
    if old:
        w["cls"], w["Transformer/posembed_input/pos_embedding"] = cls, pe
    else:  # big_vision adds the grid's embeddings before the class token joins: its own is folded into it
        w["cls"], w["pos_embedding"] = cls + pe[:, :1], pe[:, 1:]
    mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if old else \
        ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    blocks = []
    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv_w, qkv_b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
        b = {"LayerNorm_0/scale": sd[p + "norm1.weight"], "LayerNorm_0/bias": sd[p + "norm1.bias"],
             f"{ln2}/scale": sd[p + "norm2.weight"], f"{ln2}/bias": sd[p + "norm2.bias"],
             f"{mha}/out/kernel": sd[p + "attn.proj.weight"].T.reshape(h, d // h, d),
             f"{mha}/out/bias": sd[p + "attn.proj.bias"]}
        for j, name in enumerate(("query", "key", "value")):
            b[f"{mha}/{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            b[f"{mha}/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        for j in range(2):
            b[f"{mlp}/Dense_{j}/kernel"] = sd[p + f"mlp.fc{j + 1}.weight"].T
            b[f"{mlp}/Dense_{j}/bias"] = sd[p + f"mlp.fc{j + 1}.bias"]
        blocks.append(b)
    if scanned:  # big_vision's scan=True: one stacked entry per name
        w.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        w.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    return w


def to_big_vision_mixer(module) -> dict[str, np.ndarray]:
    """timm's Mixer in the layout of vision_transformer's models_mixer.py / big_vision's mlp_mixer.py."""
    sd = {k: v.numpy() for k, v in module.state_dict().items()}
    w = {"stem/kernel": sd["stem.proj.weight"].transpose(2, 3, 1, 0), "stem/bias": sd["stem.proj.bias"],
         "pre_head_layer_norm/scale": sd["norm.weight"], "pre_head_layer_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(DEPTH):
        p, q = f"blocks.{i}.", f"MixerBlock_{i}/"
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            w[q + theirs + "/scale"], w[q + theirs + "/bias"] = sd[p + ours + ".weight"], sd[p + ours + ".bias"]
        for ours, theirs in (("mlp_tokens", "token_mixing"), ("mlp_channels", "channel_mixing")):
            for j in range(2):
                w[f"{q}{theirs}/Dense_{j}/kernel"] = sd[f"{p}{ours}.fc{j + 1}.weight"].T
                w[f"{q}{theirs}/Dense_{j}/bias"] = sd[f"{p}{ours}.fc{j + 1}.bias"]
    return w


@pytest.mark.parametrize("layout", ["big_vision", "big_vision scanned", "vision_transformer"])
def test_big_vision_vit_npz_computes_the_same_logits(tmp_path, layout):
    module = timm_vit()
    np.savez(tmp_path / "vit.npz", **to_big_vision_vit(module, old=layout == "vision_transformer",
                                                       scanned="scanned" in layout))
    pre = logits_match(VIT, module, tmp_path / "vit.npz")
    assert pre.info["format"] == f"{layout.split()[0]} ViT (npz)"


def test_big_vision_mixer_npz_computes_the_same_logits(tmp_path):
    module = timm_mixer()
    np.savez(tmp_path / "mixer.npz", **to_big_vision_mixer(module))
    assert logits_match(MIXER, module, tmp_path / "mixer.npz").info["format"] == "big_vision Mixer (npz)"


# ------------------------------------------------------------------------------- position embeddings, head
def test_resample_posemb_is_big_visions_linear_zoom():
    """A 2x2 grid to 3x3: scipy's order-1 zoom keeps the corners and puts the means between them."""
    a, b, c, d = 1.0, 2.0, 5.0, 11.0
    grid = np.array([a, b, c, d], np.float32).reshape(1, 4, 1)
    got = pretrained.resample_posemb(grid, (3, 3)).reshape(3, 3)
    want = [[a, (a + b) / 2, b], [(a + c) / 2, (a + b + c + d) / 4, (b + d) / 2], [c, (c + d) / 2, d]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_32px_checkpoint_loads_into_a_64px_model_with_resampled_position_embeddings(tmp_path):
    module = timm_vit()
    path = save(module, tmp_path / "vit.safetensors")
    pre = pretrained.load(path, VIT, input_shape=(64, 64, 3), num_classes=10)
    assert pre.info["posemb"] == "resampled 4x4 -> 8x8"
    saved = module.pos_embed.detach().numpy()
    got = pre.params["pos_embed"]
    assert got.shape == (1, 1 + 64, DIM)
    np.testing.assert_array_equal(got[:, :1], saved[:, :1])  # the class token's own, kept
    np.testing.assert_allclose(got[:, 1:], pretrained.resample_posemb(saved[:, 1:], (8, 8)), rtol=1e-6)
    np.testing.assert_allclose(got[0, 1], saved[0, 1], rtol=1e-6)  # corners stay (align-corners zoom)
    f, params = ours(VIT, pre, (64, 64, 3))
    assert bool(jnp.all(jnp.isfinite(f(params, batch(size=64)[0]))))


def test_the_head_is_reset_when_the_class_count_differs_and_kept_when_asked(tmp_path):
    path = save(timm_vit(), tmp_path / "vit.safetensors")
    pre = pretrained.load(path, VIT, input_shape=(IMG, IMG, 3), num_classes=3)
    assert "head" not in pre.params and pre.info["head"] == "reset (10 -> 3 classes)"
    pre = pretrained.load(path, VIT, input_shape=(IMG, IMG, 3), num_classes=10, reset_head="true")
    assert "head" not in pre.params and pre.info["head"] == "reset (10 -> 10 classes)"
    pre = pretrained.load(path, VIT, input_shape=(IMG, IMG, 3), num_classes=10, reset_head="false")
    assert pre.params["head"]["kernel"].shape == (DIM, 10) and pre.info["head"] == "loaded"
    # merge keeps the model's own (initialised) head where the file's was left out
    params = jax.jit(lambda: nnx.state(models.create(VIT, (IMG, IMG, 3), 3, rngs=nnx.Rngs(0)), nnx.Param))()
    merged = pretrained.merge(params, pretrained.load(path, VIT, input_shape=(IMG, IMG, 3), num_classes=3))
    np.testing.assert_array_equal(merged["head"]["kernel"].value, params["head"]["kernel"].value)
    assert not np.allclose(merged["cls"].value, params["cls"].value)


# ----------------------------------------------------------------------------------------------- bad input
def one_line(key, *needles):
    """The error is one line naming ``key`` and each of ``needles``."""
    def check(e):
        text = str(e.value)
        assert "\n" not in text and text.startswith(key + "="), text
        for n in needles:
            assert n in text, (n, text)
    return check


def load_error(source, cfg=VIT, shape=(IMG, IMG, 3), num_classes=10, reset_head="auto"):
    with pytest.raises(ConfigError) as e:
        pretrained.load(str(source), cfg, input_shape=shape, num_classes=num_classes, reset_head=reset_head)
    return e


def test_a_missing_file_is_one_line(tmp_path):
    one_line("model.init_from", "no such file", "hf-hub:")(load_error(tmp_path / "nope.safetensors"))


def test_an_unknown_format_is_one_line(tmp_path):
    (tmp_path / "w.safetensors").write_text("these are not weights\n")
    one_line("model.init_from", "unknown format", ".safetensors")(load_error(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "other.npz", **{"conv1/kernel": np.zeros((3, 3, 3, 8), np.float32)})
    one_line("model.init_from", "unknown format", "conv1/kernel")(load_error(tmp_path / "other.npz"))


def good_safetensors(path):
    """A timm ViT's state dict written by the safetensors library (numpy), as the hub serves it."""
    from safetensors.numpy import save_file as save_numpy

    save_numpy({k: v.detach().numpy().copy() for k, v in timm_vit().state_dict().items()}, str(path))
    return path


def safetensors_parts(path):
    """(header dict, the data after it) of a .safetensors file, read by its documented layout."""
    import json

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data):
    import json

    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def damaged_safetensors(tmp_path, damage):
    good = good_safetensors(tmp_path / "good.safetensors")
    header, data = safetensors_parts(good)
    raw, n = good.read_bytes(), 8 + int.from_bytes(good.read_bytes()[:8], "little")
    name = "blocks.0.attn.qkv.weight"
    start, end = header[name]["data_offsets"]
    bad = tmp_path / "bad.safetensors"
    if damage == "cut in the header":
        bad.write_bytes(raw[:n // 2])
    elif damage == "cut in the data":
        bad.write_bytes(raw[:n + len(data) // 2])
    elif damage == "offsets past the end":
        header[name]["data_offsets"] = [len(data) + 64, len(data) + 64 + end - start]
        write_safetensors(bad, header, data)
    elif damage == "offsets of another length":
        header[name]["data_offsets"] = [start, end - 4]
        write_safetensors(bad, header, data)
    elif damage == "unknown dtype":
        header[name]["dtype"] = "Q4_K"
        write_safetensors(bad, header, data)
    elif damage == "header not JSON":
        bad.write_bytes(raw[:9] + b"\x00garbage" + raw[17:])  # (the length and the opening brace kept)
    elif damage == "overlapping tensors":
        other = "blocks.0.attn.proj.bias"
        s, e = header[other]["data_offsets"]
        header[other]["data_offsets"] = [start, start + e - s]
        write_safetensors(bad, header, data)
    return bad


@pytest.mark.parametrize("damage, says", [
    ("cut in the header", "truncated in its header"),
    ("cut in the data", "truncated, or its header damaged: tensor "),
    ("offsets past the end", "blocks.0.attn.qkv.weight's data_offsets"),
    ("offsets of another length", "blocks.0.attn.qkv.weight's data_offsets ["),
    ("unknown dtype", "tensor blocks.0.attn.qkv.weight has dtype 'Q4_K', which this loader cannot read"),
    ("header not JSON", "header is not JSON"),
    ("overlapping tensors", "overlap"),
])
def test_a_damaged_safetensors_file_is_one_line_naming_it_and_what_is_wrong(tmp_path, damage, says):
    bad = damaged_safetensors(tmp_path, damage)
    e = load_error(bad)
    one_line("model.init_from", str(bad), says)(e)
    if damage == "offsets past the end":
        assert "run past the end of the file" in str(e.value)
    if damage == "offsets of another length":
        assert "hold 12284 bytes, but F32 x [96, 32] needs 12288" in str(e.value)
    with pytest.raises(ConfigError) as d:  # (describe reads the same way)
        pretrained.describe(str(bad))
    assert str(d.value) == str(e.value)


def test_a_good_safetensors_file_written_by_the_library_reads_as_the_library_reads_it(tmp_path):
    from safetensors.numpy import load_file

    good = good_safetensors(tmp_path / "good.safetensors")
    theirs = load_file(str(good))
    mine, container = pretrained.read(good)
    assert container == "safetensors" and set(mine) == set(theirs)
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype
        np.testing.assert_array_equal(mine[k], theirs[k])


def big_vision_npz(path, **extra):
    np.savez(path, **{"embedding/kernel": np.zeros((PATCH, PATCH, 3, DIM), np.float32),
                      "embedding/bias": np.zeros(DIM, np.float32)}, **extra)
    return path


@pytest.mark.parametrize("damage, says", [
    ("object array", "the .npz array cls holds Python objects (dtype=object)"),
    ("truncated", "a damaged or truncated zip archive"),
    ("corrupt member", "the .npz member embedding/bias is damaged (BadZipFile"),
    ("member not an array", "the .npz member notes is not a .npy array"),
    ("strings", "the .npz array names has dtype <U5"),
])
def test_a_damaged_npz_file_is_one_line_naming_it_and_what_is_wrong(tmp_path, damage, says):
    import zipfile

    bad = tmp_path / "bad.npz"
    if damage == "object array":
        big_vision_npz(bad, cls=np.array([{"a": 1}], dtype=object))
    elif damage == "truncated":
        good = big_vision_npz(tmp_path / "good.npz")
        bad.write_bytes(good.read_bytes()[:200])
    elif damage == "corrupt member":
        good = big_vision_npz(tmp_path / "good.npz")
        raw = bytearray(good.read_bytes())
        with zipfile.ZipFile(good) as z:  # a byte of the bias's data flipped (np.savez stores, uncompressed)
            info = z.getinfo("embedding/bias.npy")
        at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size - 1
        raw[at] ^= 0xFF
        bad.write_bytes(bytes(raw))
    elif damage == "member not an array":
        big_vision_npz(bad)
        with zipfile.ZipFile(bad, "a") as z:
            z.writestr("notes.npy", "trained for 300 epochs")
    elif damage == "strings":
        big_vision_npz(bad, names=np.array(["a", "bcdef"]))
    one_line("model.init_from", str(bad), says)(load_error(bad))


def test_a_file_trained_on_other_channels_names_data_channels(tmp_path):
    """A 3-channel file onto 1-channel data (digits, MNIST): one complete line naming data.channels=3."""
    path = save(timm_vit(), tmp_path / "vit.safetensors")
    e = load_error(path, shape=(IMG, IMG, 1))
    one_line("model.init_from", "was trained on 3-channel images, the data have 1",
             "set data.channels=3 (gray images repeated to RGB)")(e)
    assert str(e.value).endswith(")")
    gray = save(timm_vit(in_chans=1), tmp_path / "gray.safetensors")
    one_line("model.init_from", "trained on 1-channel images, the data have 3", "set data.channels=1")(load_error(gray))


def test_another_architecture_names_the_preset_that_fits(tmp_path):
    e = load_error(save(timm_mixer(), tmp_path / "mixer.safetensors"))
    one_line("model.init_from", "timm Mixer", "not a vit", "model=mixer model.patch_size=8")(e)


def test_another_size_lists_mismatched_names_and_what_fits(tmp_path):
    e = load_error(save(timm_vit(), tmp_path / "vit.safetensors"), cfg=dataclasses.replace(VIT, hidden_size=64,
                                                                                            num_layers=3))
    one_line("model.init_from", "does not fit model=vit", "blocks.0.attn.out.kernel (32, 32) in the file, (64, 64) in "
             "the model", "blocks.2.attn.out.bias missing from the file", "it fits model.hidden_size=32 "
             "model.num_layers=2")(e)


def test_a_standard_size_names_its_preset(tmp_path):
    """timm's vit_tiny_patch16_224 into model=vit_s: the line says model=vit_ti."""
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = save(module, tmp_path / "ti.safetensors")
    e = load_error(path, cfg=compose(["model=vit_s"]).model, shape=(224, 224, 3), num_classes=1000)
    one_line("model.init_from", "it fits model=vit_ti")(e)


def test_another_patch_size_says_resampling_patches_is_not_supported(tmp_path):
    e = load_error(save(timm_vit(), tmp_path / "vit.safetensors"), cfg=dataclasses.replace(VIT, patch_size=4))
    one_line("model.init_from", "patches are 8x8", "model.patch_size=4", "set model.patch_size=8",
             "not supported")(e)


def test_the_norm_after_pooling_must_match_model_fc_norm(tmp_path):
    """Pooling before or after the final norm uses the same names: the file's fc_norm decides, in one line."""
    path = save(timm_vit(global_pool="avg", class_token=False), tmp_path / "gap.safetensors")
    one_line("model.init_from", "comes after pooling, model.fc_norm=false", "model.fc_norm=true")(
        load_error(path, cfg=dataclasses.replace(VIT, classifier="gap")))
    path = save(timm_vit(global_pool="avg"), tmp_path / "gap_cls.safetensors")
    one_line("model.init_from", "class token", "not supported")(
        load_error(path, cfg=dataclasses.replace(VIT, classifier="gap", fc_norm=True)))


def test_a_head_with_fewer_classes_than_the_data_needs_reset_head(tmp_path):
    path = save(timm_vit(), tmp_path / "vit.safetensors")
    one_line("model.reset_head", "10 classes, fewer than the 20", "model.reset_head=auto")(
        load_error(path, num_classes=20, reset_head="false"))
    one_line("model.reset_head", "the model 5", "model.num_classes=10")(load_error(path, num_classes=5,
                                                                                 reset_head="false"))


def test_a_mixer_at_another_image_size_says_which_size_fits(tmp_path):
    e = load_error(save(timm_mixer(), tmp_path / "mixer.safetensors"), cfg=MIXER, shape=(64, 64, 3))
    one_line("model.init_from", "mixes 16 tokens", "train at 32x32")(e)


def test_init_from_is_refused_for_models_without_a_mapping():
    with pytest.raises(ConfigError) as e:
        compose([*FAST, "model=cnn", "model.init_from=w.safetensors"])
    one_line("model.init_from", "model=cnn cannot load pretrained weights")(e)
    with pytest.raises(ConfigError) as e:
        compose([*FAST, "model=vit", "model.reset_head=maybe"])
    one_line("model.reset_head", "auto, true, false")(e)
    assert compose(["model=vit_b", "model.reset_head=true"]).model.reset_head.lower() == "true"


# ------------------------------------------------------------------------------------------------ remote
def fill_hub_cache(cache, repo_id, filename, data: bytes, commit="0123456789abcdef0123456789abcdef01234567"):
    """The hub cache's documented layout: blobs/<hash>, snapshots/<commit>/<file> -> the blob, refs/main."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snap = repo / "snapshots" / commit / filename
    snap.parent.mkdir(parents=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_loads_from_a_filled_cache_offline(tmp_path, monkeypatch):
    path = save(timm_vit(), tmp_path / "vit.safetensors")
    with open(path, "rb") as f:
        fill_hub_cache(tmp_path / "hub", "timm/vit_test", "model.safetensors", f.read())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # (never reached: the cache answers)
    pre = pretrained.load("hf-hub:timm/vit_test", VIT, input_shape=(IMG, IMG, 3), num_classes=10)
    assert pre.info["source"] == "hf-hub:timm/vit_test" and pre.info["head"] == "loaded"
    assert pre.info["sha256"] == pretrained.sha256(path)


def test_an_unreachable_hub_id_or_url_is_one_line_saying_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # (.invalid never resolves: no waiting)
    one_line("model.init_from", "hf-hub:timm/vit_none", str(tmp_path / "hub"), "hub.invalid cannot be reached",
             "hf download timm/vit_none model.safetensors")(load_error("hf-hub:timm/vit_none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = "https://weights.invalid/vit_b16.safetensors"
    e = load_error(url)
    one_line("model.init_from", url, str(tmp_path / "cache" / "vision_train" / "weights"), "curl -L -o")(e)
    assert not list((tmp_path / "cache" / "vision_train" / "weights").iterdir())  # nothing half-written kept


def test_an_https_url_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    """The real download code against a local server (http: the same code path as https): the file lands in
    ~/.cache/vision_train/weights whole, and the next load reads it from there without the server."""
    import functools
    import http.server
    import threading

    (tmp_path / "served").mkdir()
    path = save(timm_vit(), tmp_path / "served" / "vit.safetensors")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/vit.safetensors"
    try:
        pre = pretrained.load(url, VIT, input_shape=(IMG, IMG, 3), num_classes=10)
    finally:
        server.shutdown()
        server.server_close()
    cached = list((tmp_path / "cache" / "vision_train" / "weights").iterdir())
    assert [p.name.endswith("-vit.safetensors") for p in cached] == [True]
    assert pre.info["sha256"] == pretrained.sha256(path) == pretrained.sha256(cached[0])
    again = pretrained.load(url, VIT, input_shape=(IMG, IMG, 3), num_classes=10)  # (the server is gone)
    assert again.info["path"] == str(cached[0].resolve()) and again.info["source"] == url


def test_describe_says_what_a_file_holds(tmp_path):
    info = pretrained.describe(save(timm_vit(qkv_bias=False), tmp_path / "vit.safetensors"))
    assert info["arch"] == "vit" and info["num_classes"] == 10 and info["in_channels"] == 3
    assert info["keys"] == {"patch_size": PATCH, "hidden_size": DIM, "num_layers": DEPTH, "mlp_dim": 4 * DIM,
                            "classifier": "token", "qkv_bias": False, "fc_norm": False}


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("preset,timm_name", [("vit_ti", "vit_tiny_patch16_224"), ("vit_s", "vit_small_patch16_224"),
                                              ("vit_b", "vit_base_patch16_224"), ("mixer_b", "mixer_b16_224")])
def test_presets_have_timms_parameter_names_and_shapes(preset, timm_name):
    """model=<preset> and no other model key holds exactly what timm's model holds (after the mapping)."""
    with torch.device("meta"):  # (shapes only: nothing allocated)
        sd = timm.create_model(timm_name, pretrained=False).state_dict()
    mapped, arch, fmt = pretrained._to_ours({k: np.broadcast_to(np.float32(0), v.shape) for k, v in sd.items()},
                                            "torch", timm_name)
    theirs = {k: v.shape for k, v in mapped.items()}
    cfg = compose([f"model={preset}"]).model
    want = {k: tuple(v.shape) for k, v in pretrained.expected_params(cfg, (224, 224, 3), 1000).items()}
    assert theirs == want and arch == cfg.arch and fmt.startswith("timm ")
    assert cfg.gelu == "exact" and cfg.layer_norm_eps == 1e-6


# --------------------------------------------------------------------------------------------------- a run
def tiny_digits_run(tmp_path):
    """A tiny ViT on digits (8x8, patch 4) starting from a timm file: (its path, the command line)."""
    module = perturbed(VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                                         num_classes=10))
    path = save(module, tmp_path / "tiny.safetensors")
    return path, [*FAST, "data=digits", "model=vit", "model.patch_size=4", "model.hidden_size=16",
                  "model.num_layers=1", "model.num_heads=2", "model.mlp_dim=64", "model.gelu=exact",
                  f"model.init_from={path}", "trainer.batch_size=64", "trainer.epochs=1",
                  f"hydra.run.dir={tmp_path / 'run'}"]


def test_a_run_starts_from_a_written_checkpoint_and_records_its_hash(tmp_path):
    """The log line, config.yaml and the W&B run's config name the file and its sha256."""
    path, args = tiny_digits_run(tmp_path)
    digest, run_dir = pretrained.sha256(path), tmp_path / "run"
    r = run_cli([*args, "logger.mode=offline"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert f"model.init_from: {path} (timm ViT (safetensors), sha256 {digest[:12]}) | head loaded" in out
    config = (run_dir / "config.yaml").read_text()
    assert f"# model.init_from sha256: {digest}" in config and f"init_from: {path}" in config
    records = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # (the W&B run's config is in it)
    assert records and digest.encode() in records[0].read_bytes()


@pytest.mark.slow
def test_a_resumed_fine_tune_does_not_need_the_file_again(tmp_path):
    """A resume restores the tuned weights from its checkpoint; the pretrained file may be gone by then."""
    from vision_train.train.loop import train

    path, args = tiny_digits_run(tmp_path)
    args = [a.replace("trainer.epochs=1", "trainer.epochs=2") for a in args]
    with pytest.raises(Stopped):  # stopped after its first epoch (and that epoch's checkpoint)
        train(compose([a for a in args if not a.startswith("hydra.")]), tmp_path / "run", hooks=[stop_at(19)])
    os.remove(path)
    r = run_cli(args, cwd=tmp_path)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "model.init_from:" not in r.stdout + r.stderr


def jits_of_assemble(monkeypatch) -> list:
    """The functions the run's assembly hands to ``jax.jit`` from here on (by qualified name): the model's
    init is the first (``assemble.<locals>.<lambda>``), compiled as soon as it is called."""
    made, real = [], jax.jit

    def recording(*args, **kwargs):
        name = getattr(args[0], "__qualname__", "") if args else ""
        if name.startswith("assemble.<locals>"):
            made.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(jax, "jit", recording)
    return made


def three_channel_digits_run(tmp_path):
    """A tiny timm ViT trained on 3-channel 8x8 images, and a run of it on digits (1 channel)."""
    module = perturbed(VisionTransformer(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2,
                                         num_classes=10))
    path = save(module, tmp_path / "rgb.safetensors")
    return path, [*FAST, "data=digits", "model=vit", "model.patch_size=4", "model.hidden_size=16",
                  "model.num_layers=1", "model.num_heads=2", "model.mlp_dim=64", "model.gelu=exact",
                  f"model.init_from={path}", "trainer.batch_size=64", "trainer.epochs=1"]


@pytest.mark.parametrize("bad", ["truncated", "3 channels onto 1"])
def test_a_bad_init_from_file_fails_before_the_model_init_compiles(tmp_path, monkeypatch, bad):
    """The file is read and checked against the model's shapes (abstract) before the init is jitted."""
    from vision_train.train.loop import train

    path, args = three_channel_digits_run(tmp_path)
    if bad == "truncated":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[:len(raw) - 100])
        args = [*args, "data.channels=3"]
    made = jits_of_assemble(monkeypatch)
    with pytest.raises(ConfigError) as e:
        train(compose(args), tmp_path / "run")
    one_line("model.init_from", "truncated" if bad == "truncated" else "set data.channels=3")(e)
    assert made == []


def test_a_three_channel_file_fine_tunes_on_digits_with_data_channels_3(tmp_path, monkeypatch):
    """digits (8x8x1) with data.channels=3 takes a file trained on RGB images: the run's model is built for
    8x8x3, its init compiled and the file's weights merged into it (the run is stopped there)."""
    from safetensors.numpy import load_file

    from vision_train.train.loop import train
    from vision_train.train.state import param_paths

    path, args = three_channel_digits_run(tmp_path)
    cfg = compose([*args, "data.channels=3"])
    assert cfg.data.channels == 3 and compose(args).data.channels == 1  # (unset: as stored)
    made = jits_of_assemble(monkeypatch)
    loaded, merged, real_load, real_merge = [], [], pretrained.load, pretrained.merge

    class Merged(Exception):
        pass

    def load(*args, **kwargs):
        loaded.append((kwargs["input_shape"], real_load(*args, **kwargs)))
        return loaded[-1][1]

    def merge(*args, **kwargs):
        merged.append(real_merge(*args, **kwargs))
        raise Merged

    monkeypatch.setattr(pretrained, "load", load)
    monkeypatch.setattr(pretrained, "merge", merge)
    with pytest.raises(Merged):
        train(cfg, tmp_path / "run")
    (shape, pre), = loaded
    assert shape == (8, 8, 3) and pre.info["head"] == "loaded" and pre.info["format"] == "timm ViT (safetensors)"
    assert made == ["assemble.<locals>.<lambda>"]  # (read before the init's jit; the recording sees that jit)
    params, theirs = param_paths(jax.device_get(merged[0])), load_file(path)
    np.testing.assert_array_equal(params["embed.proj.kernel"], theirs["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["head.kernel"], theirs["head.weight"].T)
