"""Pretrained weights: timm state dicts (.safetensors, PyTorch .bin/.pth) and big_vision / vision_transformer
``.npz`` files, mapped onto this package's modules (DESIGN.md, decision 9).

    pre = load("vit_b16.safetensors", cfg.model, input_shape=(224, 224, 3), num_classes=10)
    state = state.replace(params=merge(state.params, pre), other=merge_stats(state.other, pre))

``load`` reads the file (numpy; torch only for ``.bin``/``.pth``), finds its layout among the registered
architectures' (``models.Weights.formats``: a name only that layout has), makes PyTorch's layouts Flax's
(OIHW -> HWIO, (out, in) -> (in, out)), has the architecture rename its arrays to the model's parameter paths
(``blocks.3.attn.qkv.kernel``; a BatchNorm's running statistics to its ``nnx.BatchStat`` paths, ``stats``),
checks every name and shape against the model ``cfg`` builds, drops the head
when it is to be re-initialised and lets the architecture fit the rest to the images (e.g. a ViT resamples its
position embeddings when the patch grid differs, as big_vision's ``resample_posemb``). Whatever does not fit
is one ``ConfigError`` naming ``model.init_from`` (or ``model.reset_head``) and what would fit (a preset of
conf/model, or the keys), before anything compiles. Each architecture's module describes the layouts it reads.
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
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from ..errors import ConfigError
from . import REGISTRY, WeightFormat, cannot_load, create, loads_weights, presets

log = logging.getLogger("vision_train")

KEY = "model.init_from"
HF_PREFIX = "hf-hub:"
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, in its order


@dataclass
class Pretrained:
    params: dict  # nested like nnx.state(model, nnx.Param).to_pure_dict(); numpy; no head entries when reset
    info: dict    # path, sha256, format, head, posemb (the run's metadata)
    stats: dict = field(default_factory=dict)  # nested like nnx.state(model, nnx.BatchStat): running statistics


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
def _from_pytorch(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch's layouts -> Flax's, names kept but for the last part: a convolution's ``weight`` OIHW -> ``kernel``
    HWIO, a linear layer's (out, in) -> ``kernel`` (in, out), a LayerNorm's ``weight`` -> ``scale``."""
    out = {}
    for name, a in sd.items():
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


def _formats() -> list[tuple[str, WeightFormat]]:
    """Every layout the registered architectures read, as (architecture, format), in the order they are tried."""
    return [(name, f) for name, a in REGISTRY.items() if a.weights is not None for f in a.weights.formats]


def _detect(raw: dict[str, np.ndarray], container: str, source: str) -> tuple[dict, str, WeightFormat]:
    """-> (the arrays by the names of their layout, the architecture they are, the layout)."""
    raw = {re.sub(r"^(opt/target/|params/)", "", k): v for k, v in raw.items()}  # big_vision/Flax train states
    for arch, f in _formats():
        if f.marker in raw and (f.matches is None or f.matches(raw)):
            return raw, arch, f
    names = ", ".join(list(raw)[:4])
    known = "; ".join(f"{f.name} ({f.marker})" for _, f in _formats() if f.matches is None)
    raise ConfigError(KEY, source, f"unknown format: a {container} file in none of the layouts this loader reads "
                      f"({known}); its first names: {names or 'none'}")


def _ours(raw: dict[str, np.ndarray], f: WeightFormat) -> dict[str, np.ndarray]:
    return f.to_ours(_from_pytorch(raw) if f.pytorch else raw)


def _to_ours(raw: dict[str, np.ndarray], container: str, source: str) -> tuple[dict[str, np.ndarray], str, str]:
    """-> (arrays by our dotted path, the architecture they are, a description of the format)."""
    raw, arch, f = _detect(raw, container, source)
    return _ours(raw, f), arch, f"{f.name} ({container})"


def _mapped(raw: dict[str, np.ndarray], container: str, source: str) -> tuple[dict, str, WeightFormat, dict]:
    """The arrays by our dotted path and the model keys they give (the architecture's ``file_keys``): (arrays,
    architecture, layout, keys). Arrays under the right names but of shapes the architecture never has (a
    damaged or foreign file) are one ``ConfigError``."""
    raw, arch, f = _detect(raw, container, source)
    weights = REGISTRY[arch].weights
    try:
        ours = _ours(raw, f)
        keys = weights.file_keys(ours)
        kernel = ours[weights.input_kernel]
        if kernel.ndim != 4:
            raise ValueError(f"its first layer's kernel is {tuple(kernel.shape)}, not a 4-D convolution kernel")
        return ours, arch, f, keys
    except (ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(KEY, source, f"its arrays have the names but not the shapes of a {f.name} checkpoint "
                          f"({container}; {_why(e)})") from None


# ------------------------------------------------------------------------------------------- fitting
def _what_fits(keys: dict, arch: str, cfg, gelu: str) -> str:
    """The ``model=`` / ``model.*`` overrides under which ``cfg`` fits a file of architecture ``arch`` whose
    arrays give ``keys`` and whose code computes ``gelu``: a preset of its sizes (conf/model) where there is one."""
    def gelu_key(schema_or_cfg) -> str:
        has = getattr(schema_or_cfg, "gelu", gelu)
        return "" if has == gelu else f" model.gelu={gelu}"

    def overrides(base) -> str:
        return " ".join(f"model.{k}={_yaml(v)}" for k, v in keys.items() if getattr(base, k, None) != v)

    if cfg.arch != arch or any(getattr(cfg, k, None) != v for k, v in keys.items()):
        for name, preset in presets().items():  # (presets of every size but the patches', the file's)
            if preset.arch == arch and all(getattr(preset, k, None) == v for k, v in keys.items() if k != "patch_size"):
                return " ".join(filter(None, [f"model={name}", overrides(preset)])) + gelu_key(preset)
    if cfg.arch == arch:
        differ = "hidden_size" in keys and getattr(cfg, "hidden_size", None) != keys["hidden_size"]
        heads = " (and the file's model.num_heads)" if differ else ""
        return overrides(cfg) + heads + gelu_key(cfg)
    return f"model={arch} {overrides(None)}" + gelu_key(REGISTRY[arch].schema())


def _yaml(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def expected_params(model_cfg, input_shape, num_classes: int, kind=nnx.Param) -> dict[str, jax.ShapeDtypeStruct]:
    """The model's parameters (``kind``: or e.g. its ``nnx.BatchStat``) by dotted path, as shapes (nothing is
    computed)."""
    return _flatten(nnx.state(_abstract_model(model_cfg, input_shape, num_classes), kind).to_pure_dict())


_ABSTRACT: dict = {}  # the last few abstract models, by their config's repr, input shape and classes


def _abstract_model(model_cfg, input_shape, num_classes: int):
    """The model built from shapes alone (traced, never computed). Tracing a deep model's construction takes
    seconds (a ResNet-101: ~4 s on 2 CPU cores), and a load asks for its parameters and its running statistics:
    the same model for both."""
    key = (repr(model_cfg), tuple(input_shape), num_classes)
    if key not in _ABSTRACT:
        if len(_ABSTRACT) >= 4:
            _ABSTRACT.pop(next(iter(_ABSTRACT)))
        _ABSTRACT[key] = nnx.eval_shape(lambda: create(model_cfg, input_shape, num_classes, rngs=nnx.Rngs(0),
                                                       dtype=jnp.float32))
    return _ABSTRACT[key]


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
    """The image channels the file's first layer (an HWIO kernel) takes."""
    return int(ours[REGISTRY[arch].weights.input_kernel].shape[2])


def describe(source: str) -> dict:
    """What a weights file holds, from its arrays alone: {path, format, arch, num_classes (None: no head),
    in_channels, keys: the ``model.*`` keys it determines}. E.g. to build a model that keeps its head."""
    path = resolve(source)
    raw, container = read(path)
    ours, arch, f, keys = _mapped(raw, container, source)
    return {"path": str(path), "format": f"{f.name} ({container})", "arch": arch,
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
    if not loads_weights(model_cfg.arch):
        raise ConfigError(KEY, source, cannot_load(model_cfg.arch))
    path = resolve(source)
    raw, container = read(path)
    ours, arch, layout, keys = _mapped(raw, container, source)
    del raw
    weights, fmt, file_gelu = REGISTRY[arch].weights, f"{layout.name} ({container})", layout.gelu
    if arch != model_cfg.arch:
        raise ConfigError(KEY, source, f"the file holds a {fmt}, not a {model_cfg.arch}; use "
                          f"{_what_fits(keys, arch, model_cfg, file_gelu)}")
    if "patch_size" in keys and keys["patch_size"] != model_cfg.patch_size:
        raise ConfigError(KEY, source, f"the file's patches are {keys['patch_size']}x{keys['patch_size']} but "
                          f"model.patch_size={model_cfg.patch_size}; set model.patch_size={keys['patch_size']} "
                          f"(resampling patch kernels is not supported) and size the images to fit (data.image_size)")
    have, want_c = _in_channels(ours, arch), int(input_shape[-1])
    if have != want_c:
        fix = {3: "set data.channels=3 (gray images repeated to RGB)",
               1: "set data.channels=1 (RGB images converted to gray)"}.get(have, "its first layer fits no other "
                                                                          "channel count")
        raise ConfigError(KEY, source, f"the file's {fmt} was trained on {have}-channel images, the data have "
                          f"{want_c}; {fix}")
    ours, why_not = weights.check(ours, keys, model_cfg, source)
    if why_not:  # (the same names either way: said here)
        raise ConfigError(KEY, source, f"{why_not}; it fits {_what_fits(keys, arch, model_cfg, file_gelu)}")
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

    posemb = weights.fit(ours, model_cfg, input_shape, source)
    stats = {}
    if weights.stats:  # the running statistics: the model's BatchStat, checked as the parameters are
        want_stats = expected_params(model_cfg, input_shape, num_classes, nnx.BatchStat)
        stats = {k: ours[k] for k in want_stats if k in ours}
        want = {**want, **want_stats}
    skip = {k for k in want if k.startswith("head.")} if reset else set()
    missing = [k for k in want if k not in ours and k not in skip]
    extra = [k.lstrip("?") for k in ours if k not in want]
    wrong = [k for k in want if k in ours and tuple(ours[k].shape) != tuple(want[k].shape)]
    if missing or extra or wrong:
        if clearer := weights.mismatch(wrong, ours, want, keys):
            raise ConfigError(KEY, source, clearer)
        shown = [f"{k} {tuple(ours[k].shape)} in the file, {tuple(want[k].shape)} in the model" for k in wrong[:3]]
        shown += [f"{k} missing from the file" for k in missing[:3]] + [f"{k} not in the model" for k in extra[:3]]
        more = len(wrong) + len(missing) + len(extra) - len(shown)
        fits = _what_fits(keys, arch, model_cfg, file_gelu)
        raise ConfigError(KEY, source, f"the file's {fmt} does not fit model={model_cfg.arch} as configured: "
                          f"{'; '.join(shown)}{f' (and {more} more)' if more > 0 else ''}"
                          f"{f'; it fits {fits}' if fits.strip() else ''}")
    if getattr(model_cfg, "gelu", file_gelu) != file_gelu:  # (cannot be read from the weights: said here)
        log.warning("warning: %s was trained with %s GELU, and model.gelu=%s; set model.gelu=%s to compute what it "
                    "computed", fmt, file_gelu, model_cfg.gelu, file_gelu)
    params = _nest({k: np.asarray(v, np.float32) for k, v in ours.items() if k not in stats})
    stats = _nest({k: np.asarray(v, np.float32) for k, v in stats.items()})
    info = {"path": str(path.resolve()), "sha256": sha256(path), "format": fmt, "head": head, "posemb": posemb}
    if source != str(path):
        info["source"] = source
    return Pretrained(params=params, info=info, stats=stats)


def merge(params_state, pretrained: Pretrained):
    """``params_state`` (an nnx.State of the model's parameters) with the loaded arrays in place of its own;
    each placed like the array it replaces (e.g. replicated over the mesh) and of its dtype. Entries
    ``pretrained`` lacks (a reset head) keep their values."""
    return _merged(params_state, pretrained.params)


def merge_stats(other_state, pretrained: Pretrained):
    """``other_state`` (the model's non-parameter state: ``nnx.split(model, nnx.Param, ...)``'s last part) with the
    file's running statistics (BatchNorm's) in place of its own, as ``merge`` places parameters; unchanged when
    the file has none."""
    return _merged(other_state, pretrained.stats) if pretrained.stats else other_state


def _merged(state, loaded: dict):
    new = jax.tree.map(lambda x: x, state)  # (a copy: the caller's state is left as it was)
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

    put(loaded, current, "")
    new.replace_by_pure_dict(current)
    return new
