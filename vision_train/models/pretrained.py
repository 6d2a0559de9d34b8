"""Pretrained weights for ViT and Mixer: timm state dicts and big_vision / vision_transformer ``.npz`` files,
mapped onto this package's modules (DESIGN.md, decision 9).

    pre = load("vit_b16.safetensors", cfg.model, input_shape=(224, 224, 3), num_classes=10)
    state = state.replace(params=merge(state.params, pre))

``load`` reads the file (numpy; torch only for ``.bin``/``.pth``), renames and transposes its arrays to the
model's parameter paths (``blocks.3.attn.qkv.kernel``), checks every name and shape against the model
``cfg`` builds, drops the head when it is to be re-initialised and resamples the position embeddings when
the patch grid differs (as big_vision's ``resample_posemb``). Whatever does not fit is one ``ConfigError``
naming ``model.init_from`` (or ``model.reset_head``) and what would fit, before anything compiles.

The layouts, from the code that writes them:
- timm (``VisionTransformer``, ``MlpMixer``): PyTorch names and layouts (``patch_embed.proj.weight`` OIHW,
  ``blocks.0.attn.qkv.weight`` (3D, D), ``head.weight`` (K, D)); the .safetensors the Hugging Face hub serves.
- big_vision ``models/vit.py``: ``embedding/kernel`` HWIO, ``pos_embedding`` (1, N, D) added before the class
  token ``cls`` joins, ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,
  key,value}/kernel (D, H, D/H), LayerNorm_1, MlpBlock_0/Dense_{0,1}}``, ``Transformer/encoder_norm``,
  ``pre_logits``, ``head``; scanned checkpoints stack the blocks as ``Transformer/encoderblock/...``.
- vision_transformer ``vit_jax/models_vit.py`` (the ViT paper's checkpoints): the same but
  ``Transformer/posembed_input/pos_embedding`` (1, 1 + N, D) added after the class token, and
  ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``.
- Mixer (vit_jax ``models_mixer.py``, big_vision ``mlp_mixer.py``): ``stem``, ``MixerBlock_{i}/{LayerNorm_0,
  token_mixing/Dense_{0,1}, LayerNorm_1, channel_mixing/Dense_{0,1}}``, ``pre_head_layer_norm``, ``head``.
Flax's GELU is the tanh approximation and timm's the exact one (``model.gelu``): the presets follow timm.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from ..errors import ConfigError
from . import create

log = logging.getLogger("vision_train")

KEY = "model.init_from"
HF_PREFIX = "hf-hub:"
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, in its order
# The standard sizes and their presets (conf/model): (arch, width, depth, mlp width) -> preset.
PRESETS = {("vit", 192, 12, 768): "vit_ti", ("vit", 384, 12, 1536): "vit_s", ("vit", 768, 12, 3072): "vit_b",
           ("mixer", 768, 12, 3072): "mixer_b"}


@dataclass
class Pretrained:
    params: dict  # nested like nnx.state(model, nnx.Param).to_pure_dict(); numpy; no head entries when reset
    info: dict    # path, sha256, format, head, posemb (the run's metadata)


# ------------------------------------------------------------------------------------------- finding the file
def resolve(source: str) -> Path:
    """The local file ``source`` names: a path, ``hf-hub:<repo id>[/<file>]`` (Hugging Face's cache first,
    then the hub) or an ``https://`` URL (cached under ~/.cache/vision_train/weights)."""
    if source.startswith(HF_PREFIX):
        return _from_hub(source[len(HF_PREFIX):])
    if source.startswith(("https://", "http://")):
        return _from_url(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(KEY, source, f"no such file{' (a directory)' if path.is_dir() else ''}; give the path "
                          f"of a timm .safetensors/.bin or big_vision .npz file, hf-hub:<repo id> or an https URL")
    return path


def _from_hub(ref: str) -> Path:
    # (huggingface_hub: only for a hub id; it is a dependency, but importing it costs ~0.3 s)
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import EntryNotFoundError

    parts = ref.strip("/").split("/")
    repo_id, files = "/".join(parts[:2]), (["/".join(parts[2:])] if len(parts) > 2 else list(HF_FILES))
    # HF_HUB_CACHE / HF_ENDPOINT as they are now (huggingface_hub reads its environment once, when imported)
    cache = os.environ.get("HF_HUB_CACHE") or None
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    where = cache or constants.HF_HUB_CACHE
    for filename in files:  # offline first: a cached file never touches the network
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=True))
        except (OSError, ValueError):  # (LocalEntryNotFoundError: not cached)
            pass
    host = urllib.parse.urlparse(endpoint).hostname or endpoint
    why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode() else
           None if _resolves(host) else f"{host} cannot be reached")
    if why is None:  # (the client retries a failing connection for ~25 s before it gives up)
        for filename in files:
            try:
                return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache, endpoint=endpoint))
            except EntryNotFoundError:  # the repository has no such file: try the next name
                why = f"{repo_id} has no {' or '.join(files)}"
            except Exception as e:  # noqa: BLE001 (no such repository, no access, the network: its client's kinds)
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
                break
    raise ConfigError(KEY, HF_PREFIX + ref,
                      f"not in the Hugging Face cache ({where}) and not downloaded ({why}); on a machine with "
                      f"network run `hf download {repo_id} {files[0]}` and copy its cache ({where}) here (or point "
                      f"HF_HUB_CACHE at it), or give the downloaded file's path")


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vision_train" / "weights"


def _from_url(url: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]) or "weights"
    path = cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if path.is_file():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 22):
                f.write(chunk)
        tmp.replace(path)  # whole or not at all: a broken download never sits in the cache
    except Exception as e:  # noqa: BLE001 (URLError, HTTPException, ValueError, a full disk: all one line)
        tmp.unlink(missing_ok=True)
        raise ConfigError(KEY, url, f"could not download it into {path} ({type(e).__name__}: "
                          f"{str(e).strip()[:160]}); fetch it by hand (curl -L -o '{path}' '{url}') "
                          f"or give the downloaded file's path") from None
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- reading it
AGAIN = "download or copy it again"


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def read(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The file's arrays by name, and its container: "safetensors" | "torch" | "npz" (told by its bytes,
    not its name). A damaged or unsupported file is one ``ConfigError`` naming it and what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return _read_safetensors(path, size), "safetensors"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ConfigError(KEY, str(path), f"a damaged or truncated zip archive (an .npz or a PyTorch file; "
                              f"{_why(e)}); {AGAIN}") from None
        if any(n.endswith("data.pkl") for n in names):
            return _read_torch(path), "torch"
        if any(n.endswith(".npy") for n in names):
            return _read_npz(path), "npz"
    elif head[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return _read_torch(path), "torch"
    what = "an empty file" if size == 0 else f"only {size} bytes, " if size < 9 else ""
    raise ConfigError(KEY, str(path), f"unknown format: {what}not a .safetensors, a PyTorch .bin/.pth state dict or "
                      f"an .npz file; give timm's .safetensors/.bin or a big_vision / vision_transformer .npz")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """An .npz's arrays (numpy, never unpickling): an object array, a member that is not a .npy array or a
    damaged member is one ``ConfigError`` naming it."""
    out = {}
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ConfigError(KEY, str(path), f"a damaged or truncated .npz ({_why(e)}); {AGAIN}") from None
    with z:
        for k in z.files:
            try:
                a = z[k]
            except ValueError as e:
                if "allow_pickle" in str(e) or "Object arrays" in str(e):
                    raise ConfigError(KEY, str(path), f"the .npz array {k} holds Python objects (dtype=object), "
                                      f"which are read only by unpickling; save numeric arrays (np.savez with "
                                      f"float32 arrays)") from None
                raise ConfigError(KEY, str(path), f"the .npz member {k} is damaged ({_why(e)}); {AGAIN}") from None
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise ConfigError(KEY, str(path), f"the .npz member {k} is damaged ({_why(e)}); {AGAIN}") from None
            if not isinstance(a, np.ndarray):  # (np.load hands back the raw bytes of a member that is no .npy)
                raise ConfigError(KEY, str(path), f"the .npz member {k} is not a .npy array ({len(a)} bytes that "
                                  f"do not start with numpy's array header)")
            if a.dtype.kind not in "biuf":
                raise ConfigError(KEY, str(path), f"the .npz array {k} has dtype {a.dtype}, not numbers this loader "
                                  f"reads (float, int, bool)")
            out[k] = a
    return out


# safetensors' dtype names -> numpy's (bfloat16 and float8: ml_dtypes', which JAX installs)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
              "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


def _st_dtype(name) -> np.dtype | None:
    import ml_dtypes  # (a dependency of JAX)

    numpy_name = _ST_DTYPES.get(name) if isinstance(name, str) else None
    if numpy_name is None:
        return None
    return np.dtype(getattr(ml_dtypes, numpy_name)) if hasattr(ml_dtypes, numpy_name) and not hasattr(np, numpy_name) \
        else np.dtype(numpy_name)


def _safetensors_header(path: Path, size: int) -> tuple[int, dict[str, tuple[np.dtype, list, int, int]]]:
    """Check a .safetensors file's layout (safetensors' documented one: 8 bytes of little-endian header
    length, a JSON header of name -> dtype, shape, data_offsets, then the data) against itself and the file's
    size; returns (header length, name -> (dtype, shape, start, end)). Whatever is wrong is one ``ConfigError``."""
    import json

    def bad(what: str) -> ConfigError:
        return ConfigError(KEY, str(path), f"a damaged .safetensors file: {what}")

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
    if len(raw) < n:
        raise bad(f"truncated in its header (the header is {n} bytes, the file ends {len(raw)} bytes into it); "
                  f"{AGAIN}")
    try:
        header = json.loads(raw)
    except ValueError as e:  # (json.JSONDecodeError, UnicodeDecodeError)
        raise bad(f"its {n}-byte header is not JSON ({_why(e)}); {AGAIN}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object of name -> dtype, shape, data_offsets")
    data_size = size - 8 - n
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= set(t):
            raise bad(f"tensor {name}'s header entry {str(t)[:80]} lacks dtype, shape or data_offsets")
        shape, offsets = t["shape"], t["data_offsets"]
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        if not isinstance(shape, list) or not all(whole(d) for d in shape):
            raise bad(f"tensor {name}'s shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(whole(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor {name}'s data_offsets {offsets!r} are not [start, end] with 0 <= start <= end")
        dtype = _st_dtype(t["dtype"])
        if dtype is None:
            raise ConfigError(KEY, str(path), f"tensor {name} has dtype {t['dtype']!r}, which this loader cannot "
                              f"read (it reads {', '.join(_ST_DTYPES)})")
        start, end = offsets
        need = dtype.itemsize * math.prod(shape)
        if end - start != need:
            raise bad(f"tensor {name}'s data_offsets [{start}, {end}] hold {end - start} bytes, but {t['dtype']} x "
                      f"{shape} needs {need}")
        tensors[name] = (dtype, shape, start, end)
    if tensors:
        last = max(tensors, key=lambda k: tensors[k][3])
        if tensors[last][3] > data_size:
            raise bad(f"truncated, or its header damaged: tensor {last}'s data_offsets {list(tensors[last][2:])} run "
                      f"past the end of the file, which holds {max(data_size, 0)} bytes of data after its {n}-byte "
                      f"header; {AGAIN}")
    spans = sorted((s, e, k) for k, (_, _, s, e) in tensors.items() if e > s)
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise bad(f"tensors {a} and {b} overlap (data_offsets [{s0}, {e0}] and [{s1}, {e1}])")
    return n, tensors


def _read_safetensors(path: Path, size: int) -> dict[str, np.ndarray]:
    """The file's tensors as read-only views of one memory map of it, its header checked first
    (``_safetensors_header``). (The safetensors library's numpy reader holds the file twice in memory: 890 MB
    at the peak for ViT-B/16's 346 MB; mapped, the pages are read once, when the arrays are copied into the
    model.)"""
    n, tensors = _safetensors_header(path, size)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    return {name: data[start:end].view(dtype).reshape(shape) for name, (dtype, shape, start, end) in tensors.items()}


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    import torch  # (torch: only for PyTorch's own formats)

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a damaged zip or pickle, or objects weights_only refuses)
        raise ConfigError(KEY, str(path), f"not a readable PyTorch state dict ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:120]}); save it with torch.save(model.state_dict())")
    for key in ("state_dict_ema", "state_dict", "model"):  # training checkpoints wrap the state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    return {k.removeprefix("module."): v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in sd.items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------------------- layouts -> ours
def _timm(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's names/layouts -> this package's dotted parameter paths (ViT and Mixer alike)."""
    # (fc_norm, the norm after pooling, keeps its name: the model's is ``norm`` with model.fc_norm=true)
    renames = [("patch_embed.", "embed."), (".attn.proj.", ".attn.out."), ("cls_token", "cls"),
               ("pre_logits.fc.", "pre_logits."), (".mlp_tokens.", ".token_mixing."),
               (".mlp_channels.", ".channel_mixing.")]
    out = {}
    for name, a in sd.items():
        for old, new in renames:
            name = name.replace(old, new)
        if name.endswith(".weight"):
            name = name[: -len("weight")]
            if a.ndim == 4:    # conv OIHW -> HWIO
                a, name = a.transpose(2, 3, 1, 0), name + "kernel"
            elif a.ndim == 2:  # linear (out, in) -> (in, out)
                a, name = a.T, name + "kernel"
            else:              # LayerNorm
                name += "scale"
        out[name] = a
    return out


def _leaf(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _big_vision_vit(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    old = any("MultiHeadDotProductAttention_1/" in k for k in w)  # vision_transformer's numbering
    mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if old else \
        ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    blocks = {}  # i -> {name inside the block: array}
    rest = {}
    for k, a in w.items():
        m = re.match(r"Transformer/encoderblock_(\d+)/(.+)$", k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = a
        elif k.startswith("Transformer/encoderblock/"):  # scanned: the blocks stacked on a leading axis
            for i in range(a.shape[0]):
                blocks.setdefault(i, {})[k[len("Transformer/encoderblock/"):]] = a[i]
        else:
            rest[k] = a
    out = {}
    for k, a in rest.items():
        if k.startswith("embedding/"):
            out["embed.proj." + _leaf(k)] = a
        elif k in ("pos_embedding", "Transformer/pos_embedding", "Transformer/posembed_input/pos_embedding"):
            out["pos_embed"] = a
        elif k == "cls":
            out["cls"] = a
        elif k.startswith("Transformer/encoder_norm/"):
            out["norm." + _leaf(k)] = a
        elif k.split("/")[0] in ("pre_logits", "head"):
            out[k.replace("/", ".")] = a
        else:
            out["?" + k] = a  # not part of the model: reported as the file's extra names
    for i, b in blocks.items():
        p = f"blocks.{i}."
        qkv = {}
        for k, a in b.items():
            if k.startswith(mha + "/"):
                part, leaf = k.split("/")[1:3]
                if part == "out":  # (H, D/H, D) -> (D, D)
                    out[p + "attn.out." + leaf] = a.reshape(-1, a.shape[-1]) if leaf == "kernel" else a
                else:  # query/key/value: (D, H, D/H) -> (D, D), bias (H, D/H) -> (D,)
                    qkv[(part, leaf)] = a.reshape(a.shape[0], -1) if leaf == "kernel" else a.reshape(-1)
            elif k.startswith("LayerNorm_0/"):
                out[p + "norm1." + _leaf(k)] = a
            elif k.startswith(ln2 + "/"):
                out[p + "norm2." + _leaf(k)] = a
            elif k.startswith(mlp + "/Dense_"):
                j = int(k.split("/")[1].split("_")[1])
                out[p + f"mlp.fc{j + 1}." + _leaf(k)] = a
            else:
                out["?" + f"Transformer/encoderblock_{i}/{k}"] = a
        for leaf in ("kernel", "bias"):
            parts = [qkv.get((n, leaf)) for n in ("query", "key", "value")]
            if all(x is not None for x in parts):
                out[p + "attn.qkv." + leaf] = np.concatenate(parts, axis=-1)
    return out


def _big_vision_mixer(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, a in w.items():
        m = re.match(r"MixerBlock_(\d+)/(.+)$", k)
        if k.startswith("stem/"):
            out["stem.proj." + _leaf(k)] = a
        elif k.startswith("pre_head_layer_norm/"):
            out["norm." + _leaf(k)] = a
        elif k.startswith("head/"):
            out["head." + _leaf(k)] = a
        elif m:
            i, rest = m.group(1), m.group(2)
            rest = (rest.replace("LayerNorm_0", "norm1").replace("LayerNorm_1", "norm2")
                    .replace("Dense_0", "fc1").replace("Dense_1", "fc2"))
            out[f"blocks.{i}." + rest.replace("/", ".")] = a
        else:
            out["?" + k] = a
    return out


def _to_ours(raw: dict[str, np.ndarray], container: str, source: str) -> tuple[dict[str, np.ndarray], str, str]:
    """-> (arrays by our dotted path, the architecture they are, a description of the format)."""
    raw = {re.sub(r"^(opt/target/|params/)", "", k): v for k, v in raw.items()}  # big_vision/Flax train states
    if "patch_embed.proj.weight" in raw:
        return _timm(raw), "vit", f"timm ViT ({container})"
    if "stem.proj.weight" in raw:
        return _timm(raw), "mixer", f"timm Mixer ({container})"
    if "embedding/kernel" in raw:
        old = any("MultiHeadDotProductAttention_1/" in k for k in raw)
        return _big_vision_vit(raw), "vit", f"{'vision_transformer' if old else 'big_vision'} ViT ({container})"
    if "stem/kernel" in raw:
        return _big_vision_mixer(raw), "mixer", f"big_vision Mixer ({container})"
    names = ", ".join(list(raw)[:4])
    raise ConfigError(KEY, source, f"unknown format: a {container} file that is neither timm's ViT/Mixer "
                      f"(patch_embed.proj.weight / stem.proj.weight) nor big_vision's (embedding/kernel / "
                      f"stem/kernel); its first names: {names or 'none'}")


def _mapped(raw: dict[str, np.ndarray], container: str, source: str) -> tuple[dict, str, str, dict]:
    """``_to_ours`` and ``file_keys``: (arrays by our path, architecture, format, the model keys they give). Arrays
    under the right names but of shapes no ViT/Mixer has (a damaged or foreign file) are one ``ConfigError``."""
    try:
        ours, arch, fmt = _to_ours(raw, container, source)
        keys = file_keys(ours, arch)
        kernel = ours["embed.proj.kernel" if arch == "vit" else "stem.proj.kernel"]
        if kernel.ndim != 4:
            raise ValueError(f"its patch embedding is {tuple(kernel.shape)}, not a 4-D convolution kernel")
        return ours, arch, fmt, keys
    except (ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(KEY, source, f"its arrays have the names but not the shapes of a ViT/Mixer checkpoint "
                          f"({container}; {_why(e)})") from None


# ------------------------------------------------------------------------------------------- fitting
def file_keys(ours: dict[str, np.ndarray], arch: str) -> dict:
    """The ``model.*`` keys the file's arrays determine (the head, GELU, epsilon and heads cannot be read)."""
    depth = len({k.split(".")[1] for k in ours if k.startswith("blocks.")})
    if arch == "vit":
        k = ours["embed.proj.kernel"]
        keys = {"patch_size": int(k.shape[0]), "hidden_size": int(k.shape[-1]), "num_layers": depth}
        if "blocks.0.mlp.fc1.kernel" in ours:
            keys["mlp_dim"] = int(ours["blocks.0.mlp.fc1.kernel"].shape[-1])
        keys["classifier"] = "token" if "cls" in ours else "gap"
        keys["qkv_bias"] = "blocks.0.attn.qkv.bias" in ours
        keys["fc_norm"] = "fc_norm.scale" in ours
        if "pre_logits.kernel" in ours:
            keys["representation_size"] = int(ours["pre_logits.kernel"].shape[-1])
        return keys
    k = ours["stem.proj.kernel"]
    keys = {"patch_size": int(k.shape[0]), "hidden_dim": int(k.shape[-1]), "num_blocks": depth}
    if "blocks.0.token_mixing.fc1.kernel" in ours:
        keys["tokens_mlp_dim"] = int(ours["blocks.0.token_mixing.fc1.kernel"].shape[-1])
    if "blocks.0.channel_mixing.fc1.kernel" in ours:
        keys["channels_mlp_dim"] = int(ours["blocks.0.channel_mixing.fc1.kernel"].shape[-1])
    return keys


def _what_fits(keys: dict, arch: str, cfg, flax_gelu: bool) -> str:
    """The ``model=`` / ``model.*`` overrides under which ``cfg`` fits a file whose arrays give ``keys``."""
    sizes = ((keys.get("hidden_size"), keys.get("num_layers"), keys.get("mlp_dim")) if arch == "vit" else
             (keys.get("hidden_dim"), keys.get("num_blocks"), keys.get("channels_mlp_dim")))
    preset = PRESETS.get((arch, *sizes))
    plain = arch == "mixer" or (keys["classifier"] == "token" and keys["qkv_bias"] and not keys["fc_norm"]
                                and "representation_size" not in keys)
    gelu = " model.gelu=tanh" if flax_gelu else ""
    if preset and plain and (cfg.arch != arch or any(getattr(cfg, k, None) != v for k, v in keys.items())):
        return f"model={preset}" + ("" if keys["patch_size"] == 16 else f" model.patch_size={keys['patch_size']}") + gelu
    if cfg.arch == arch:
        differ = {k: v for k, v in keys.items() if getattr(cfg, k, None) != v}
        heads = " (and the file's model.num_heads)" if "hidden_size" in differ else ""
        return " ".join(f"model.{k}={_yaml(v)}" for k, v in differ.items()) + heads + gelu
    return f"model={arch} " + " ".join(f"model.{k}={_yaml(v)}" for k, v in keys.items()) + gelu


def _yaml(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def expected_params(model_cfg, input_shape, num_classes: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The model's parameters by dotted path, as shapes (nothing is computed)."""
    model = nnx.eval_shape(lambda: create(model_cfg, input_shape, num_classes, rngs=nnx.Rngs(0), dtype=jnp.float32))
    return _flatten(nnx.state(model, nnx.Param).to_pure_dict())


def _flatten(tree: dict) -> dict:
    """{"blocks": {0: {"attn": ...}}} -> {"blocks.0.attn...": leaf}."""
    return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def _nest(flat: dict) -> dict:
    out: dict = {}
    for name, v in flat.items():
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def resample_posemb(grid: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """A (1, N, D) square grid of position embeddings -> (1, h*w, D), as big_vision's ``resample_posemb``
    (and vision_transformer's): scipy's linear zoom of the grid."""
    import scipy.ndimage  # (scipy: only when the grid differs)

    gs = math.isqrt(grid.shape[1])
    zoomed = scipy.ndimage.zoom(grid.reshape(gs, gs, -1), (new_hw[0] / gs, new_hw[1] / gs, 1), order=1)
    return zoomed.reshape(1, new_hw[0] * new_hw[1], -1)


def _in_channels(ours: dict, arch: str) -> int:
    """The image channels the file's patch embedding (an HWIO kernel) takes."""
    return int(ours["embed.proj.kernel" if arch == "vit" else "stem.proj.kernel"].shape[2])


def _posemb(ours: dict, model_cfg, input_shape, source: str) -> str:
    """Fit the file's position embeddings to the model's token grid (in place); returns what was done."""
    pe = ours.get("pos_embed")
    if pe is None or pe.ndim != 3:
        return "as saved"
    token = model_cfg.classifier == "token"
    n = pe.shape[1]
    has_cls = math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1  # vision_transformer/timm: cls first
    tok, grid = (pe[:, :1], pe[:, 1:]) if has_cls else (np.zeros_like(pe[:, :1]), pe)
    gs = math.isqrt(grid.shape[1])
    if gs * gs != grid.shape[1]:
        raise ConfigError(KEY, source, f"its position embeddings ({n} tokens) are not a square grid"
                          f"{' plus a class token' if has_cls else ''}; this loader reads square grids only")
    p = model_cfg.patch_size
    hw = (input_shape[0] // p, input_shape[1] // p)
    done = "as saved"
    if (gs, gs) != hw:
        grid = resample_posemb(grid, hw)
        done = f"resampled {gs}x{gs} -> {hw[0]}x{hw[1]}"
    # big_vision adds them before the class token joins: its entry is 0 here (the same sums)
    ours["pos_embed"] = np.concatenate([tok, grid], axis=1) if token else grid
    if not token and has_cls:
        ours["?pos_embed of the class token"] = tok
    return done


def describe(source: str) -> dict:
    """What a weights file holds, from its arrays alone: {path, format, arch, num_classes (None: no head),
    in_channels, keys: the ``model.*`` keys it determines}. E.g. to build a model that keeps its head."""
    path = resolve(source)
    raw, container = read(path)
    ours, arch, fmt, keys = _mapped(raw, container, source)
    return {"path": str(path), "format": fmt, "arch": arch,
            "num_classes": int(ours["head.bias"].shape[0]) if "head.bias" in ours else None,
            "in_channels": _in_channels(ours, arch), "keys": keys}


def load(source: str, model_cfg, *, input_shape, num_classes: int, reset_head="auto", like=None) -> Pretrained:
    """Read the weights ``source`` names for the model ``model_cfg`` builds on images of ``input_shape``
    (H, W, C) with ``num_classes`` outputs. ``reset_head``: "auto" (leave the head out, to be initialised
    anew, when its class count differs), "true" (always), "false" (never: a different count is an error).
    ``like``: that model's parameters (an nnx.State) when the caller has them (saves building it abstractly,
    ~1 s for ViT-B)."""
    reset_head = str(reset_head).lower()
    if reset_head not in ("auto", "true", "false"):
        raise ConfigError("model.reset_head", reset_head, "choose one of auto, true, false")
    if model_cfg.arch not in ("vit", "mixer"):
        raise ConfigError(KEY, source, f"model={model_cfg.arch} cannot load pretrained weights; use a vit or mixer "
                          f"preset (e.g. model=vit_b)")
    path = resolve(source)
    raw, container = read(path)
    ours, arch, fmt, keys = _mapped(raw, container, source)
    del raw
    flax_gelu = not fmt.startswith("timm")  # Flax's nn.gelu: the tanh approximation
    if arch != model_cfg.arch:
        raise ConfigError(KEY, source, f"the file holds a {fmt}, not a {model_cfg.arch}; use "
                          f"{_what_fits(keys, arch, model_cfg, flax_gelu)}")
    if keys["patch_size"] != model_cfg.patch_size:
        raise ConfigError(KEY, source, f"the file's patches are {keys['patch_size']}x{keys['patch_size']} but "
                          f"model.patch_size={model_cfg.patch_size}; set model.patch_size={keys['patch_size']} "
                          f"(resampling patch kernels is not supported) and size the images to fit (data.image_size)")
    have, want_c = _in_channels(ours, arch), int(input_shape[-1])
    if have != want_c:
        fix = {3: "set data.channels=3 (gray images repeated to RGB)",
               1: "set data.channels=1 (RGB images converted to gray)"}.get(have, "its patch embedding fits no other "
                                                                          "channel count")
        raise ConfigError(KEY, source, f"the file's {fmt} was trained on {have}-channel images, the data have "
                          f"{want_c}; {fix}")
    if arch == "vit" and keys["fc_norm"]:
        if keys["classifier"] == "token":
            raise ConfigError(KEY, source, "the file normalises after pooling and has a class token (timm's "
                              "global_pool='avg' with class_token=True, e.g. MAE/BEiT fine-tunes): average pooling "
                              "beside a class token is not supported here")
        ours = {("norm." + k.split(".", 1)[1] if k.startswith("fc_norm.") else k): v for k, v in ours.items()}
    if arch == "vit" and keys["fc_norm"] != model_cfg.fc_norm:  # (the same names either way: said here)
        raise ConfigError(KEY, source, f"the file's final norm comes {'after' if keys['fc_norm'] else 'before'} "
                          f"pooling, model.fc_norm={_yaml(model_cfg.fc_norm)}; it fits "
                          f"{_what_fits(keys, arch, model_cfg, flax_gelu and model_cfg.gelu != 'tanh')}")
    want = (expected_params(model_cfg, input_shape, num_classes) if like is None else
            _flatten(like.to_pure_dict() if hasattr(like, "to_pure_dict") else like))

    # The head: loaded, or left out for the caller's freshly initialised one.
    file_classes = int(ours["head.bias"].shape[0]) if "head.bias" in ours else None
    if reset_head == "false" and file_classes != num_classes:
        fix = ("the file has no head; use model.reset_head=auto" if file_classes is None else
               f"the file's head has {file_classes} classes, fewer than the {num_classes} of the data; use "
               f"model.reset_head=auto (a new head)" if file_classes < num_classes else
               f"the file's head has {file_classes} classes, the model {num_classes}; set "
               f"model.num_classes={file_classes} to keep it, or model.reset_head=auto (a new head)")
        raise ConfigError("model.reset_head", "false", fix)
    reset = reset_head == "true" or file_classes != num_classes
    if reset:
        note = "no head in the file" if file_classes is None else f"{file_classes} -> {num_classes} classes"
        for k in [k for k in ours if k.startswith("head.")]:
            del ours[k]
        if "pre_logits.kernel" in ours and "pre_logits.kernel" not in want:  # (goes with its head: vit_jax too)
            ours = {k: v for k, v in ours.items() if not k.startswith("pre_logits.")}
            note += "; pre-logits dropped"
        head = f"reset ({note})"
    else:
        head = "loaded"

    posemb = _posemb(ours, model_cfg, input_shape, source) if arch == "vit" else "as saved"
    skip = {k for k in want if k.startswith("head.")} if reset else set()
    missing = [k for k in want if k not in ours and k not in skip]
    extra = [k.lstrip("?") for k in ours if k not in want]
    wrong = [k for k in want if k in ours and tuple(ours[k].shape) != tuple(want[k].shape)]
    if missing or extra or wrong:
        if arch == "mixer" and wrong and all("token_mixing.fc1" in k or "token_mixing.fc2" in k for k in wrong):
            n = ours["blocks.0.token_mixing.fc1.kernel"].shape[0]
            g = math.isqrt(n)
            raise ConfigError(KEY, source, f"the file's Mixer mixes {n} tokens ({g}x{g} patches of "
                              f"{keys['patch_size']}: {g * keys['patch_size']}x{g * keys['patch_size']} images), the "
                              f"model {want['blocks.0.token_mixing.fc1.kernel'].shape[0]}; a Mixer's token-mixing "
                              f"weights fit one image size: train at {g * keys['patch_size']}x{g * keys['patch_size']}")
        shown = [f"{k} {tuple(ours[k].shape)} in the file, {tuple(want[k].shape)} in the model" for k in wrong[:3]]
        shown += [f"{k} missing from the file" for k in missing[:3]] + [f"{k} not in the model" for k in extra[:3]]
        more = len(wrong) + len(missing) + len(extra) - len(shown)
        fits = _what_fits(keys, arch, model_cfg, flax_gelu and model_cfg.gelu != 'tanh')
        raise ConfigError(KEY, source, f"the file's {fmt} does not fit model={model_cfg.arch} as configured: "
                          f"{'; '.join(shown)}{f' (and {more} more)' if more > 0 else ''}"
                          f"{f'; it fits {fits}' if fits.strip() else ''}")
    if model_cfg.gelu != ("tanh" if flax_gelu else "exact"):  # (cannot be read from the weights: said here)
        log.warning("warning: %s was trained with %s GELU, and model.gelu=%s; set model.gelu=%s to compute what it "
                    "computed", fmt, "tanh" if flax_gelu else "exact", model_cfg.gelu, "tanh" if flax_gelu else "exact")
    params = _nest({k: np.asarray(v, np.float32) for k, v in ours.items()})
    info = {"path": str(path.resolve()), "sha256": sha256(path), "format": fmt, "head": head, "posemb": posemb}
    if source != str(path):
        info["source"] = source
    return Pretrained(params=params, info=info)


def merge(params_state, pretrained: Pretrained):
    """``params_state`` (an nnx.State of the model's parameters) with the loaded arrays in place of its own;
    each placed like the array it replaces (e.g. replicated over the mesh) and of its dtype. Entries
    ``pretrained`` lacks (a reset head) keep their values."""
    new = jax.tree.map(lambda x: x, params_state)  # (a copy: the caller's state is left as it was)
    current = new.to_pure_dict()

    def put(loaded: dict, into: dict, prefix: str):
        for k, v in loaded.items():
            if k not in into:
                raise ValueError(f"pretrained parameter {prefix}{k} is not in the model")
            if isinstance(v, dict):
                put(v, into[k], f"{prefix}{k}.")
                continue
            old = into[k]
            if tuple(v.shape) != tuple(old.shape):
                raise ValueError(f"pretrained parameter {prefix}{k} has shape {v.shape}, the model {old.shape}")
            arr = np.array(v, old.dtype)  # (a copy: never a view of the file's memory map, which JAX might keep)
            into[k] = jax.device_put(arr, old.sharding) if isinstance(old, jax.Array) else arr

    put(pretrained.params, current, "")
    new.replace_by_pure_dict(current)
    return new
