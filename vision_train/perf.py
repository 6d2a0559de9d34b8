"""Speed in numbers: model FLOPs per example, each device kind's peak, and what a run achieves against it.

FLOPs are counted analytically from the model config, as 2 x the multiply-adds of every matmul and
convolution (patch embeddings, qkv/out projections, MLPs, token mixing, heads) plus attention's two batched
matmuls (QK^T and AV, 2 x T^2 x D each per example). Left out: biases, softmax, LayerNorm, GELU/ReLU,
pooling, residual adds, position embeddings. XLA's cost analysis counts those elementwise ops too, so its
figure is a few percent above this one for the model sizes people train (tests/test_perf.py checks each
architecture against it). Each architecture's module counts its own (``forward_flops`` in
``models/<arch>.py``, found through the model registry): a convolution counts the taps that land on the image,
not on its zero padding (as XLA counts them); every token a model computes counts, padding included.

A training step is 3 x the forward (``train_flops``): the backward is 2 x the forward (one matmul for the
activations' gradient, one for the weights'), the usual convention for MFU (PaLM, big_vision). Rematerialised
forwards are not counted: MFU is model FLOPs, not hardware FLOPs. (XLA's count of a real gradient is a little
lower where the first layer is a large part of the model: nothing needs the gradient of the images.) ViT-B/4 on 32x32 images (768 wide, 12 layers,
MLP 3072, 64 patches + class token) is 11.2 GFLOP forward, 33.6 per image per training step.

Peaks (``PEAK_TFLOPS``) are dense (no 2:4 sparsity) TFLOP/s per JAX device in the compute dtype. For float32
compute the figure is what JAX's default matmul precision runs at: TF32 tensor cores on NVIDIA Ampere and later,
one bfloat16 pass on TPUs (the bfloat16 peak there).

Imports JAX only inside ``xla_flops`` (its argument already is a JAX object) and where an architecture's count
asks which kernel this backend runs (given a compute dtype); no Hydra, no W&B.
"""

from __future__ import annotations

from . import models
from .errors import ConfigError

# ----------------------------------------------------------------------------------------------- peaks
# device_kind (as jax.devices()[0].device_kind says it) -> {compute dtype: dense TFLOP/s per device}. A kind
# not here is looked up by the longest key it starts with ("NVIDIA A100-SXM4-80GB" -> "NVIDIA A100"), ignoring
# case. NVIDIA: the data sheets' dense tensor-core figures (their headline numbers are with sparsity: half).
# TPU v2/v3: JAX's device is one core (half a chip); v4 and later: one chip.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA B200": {"bfloat16": 2250.0, "float32": 1100.0},
    "NVIDIA H200": {"bfloat16": 989.4, "float32": 494.7},           # SXM
    "NVIDIA H200 NVL": {"bfloat16": 835.5, "float32": 417.5},
    "NVIDIA GH200": {"bfloat16": 989.4, "float32": 494.7},
    "NVIDIA H100": {"bfloat16": 989.4, "float32": 494.7},           # SXM5: "NVIDIA H100 80GB HBM3"
    "NVIDIA H100 PCIe": {"bfloat16": 756.5, "float32": 378.0},
    "NVIDIA H100 NVL": {"bfloat16": 835.5, "float32": 417.5},
    "NVIDIA A100": {"bfloat16": 312.0, "float32": 156.0},           # SXM4 and PCIe, 40 and 80 GB
    "NVIDIA L40S": {"bfloat16": 366.0, "float32": 183.0},
    "NVIDIA L4": {"bfloat16": 121.0, "float32": 60.0},
    "TPU v2": {"bfloat16": 22.5, "float32": 22.5},
    "TPU v3": {"bfloat16": 61.5, "float32": 61.5},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v4 lite": {"bfloat16": 138.0, "float32": 138.0},           # v4i
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},           # v5e
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},                # v5p
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},           # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918.0, "float32": 918.0},
    "TPU7x": {"bfloat16": 2307.0, "float32": 2307.0},               # Ironwood
}


def _kind(device) -> tuple[str, str]:
    """(platform, device kind) of a JAX device, or ("", kind) for a kind given as a string."""
    if isinstance(device, str):
        return "", device
    return str(getattr(device, "platform", "")), str(getattr(device, "device_kind", ""))


def peak_tflops(device, precision: str, override: float | None = None) -> float | None:
    """Dense peak TFLOP/s of one ``device`` (a JAX device, or its ``device_kind``) computing in ``precision``
    ("float32" | "bfloat16", as ``hardware.precision``). ``override`` (``hardware.peak_tflops``) wins when given.
    None for CPUs and kinds not in ``PEAK_TFLOPS``: no MFU is claimed against a guess."""
    if override is not None:
        return float(override)
    platform, kind = _kind(device)
    if platform == "cpu" or not kind:
        return None
    lower = kind.strip().lower()
    matches = [k for k in PEAK_TFLOPS if lower == k.lower() or lower.startswith((k.lower() + " ", k.lower() + "-"))]
    if not matches:
        return None
    return PEAK_TFLOPS[max(matches, key=len)].get(precision)


# ----------------------------------------------------------------------------------------------- FLOPs
def forward_flops(model_cfg, input_shape, num_classes: int, *, dtype=None) -> float:
    """FLOPs of one example's forward pass through the model ``model_cfg`` (a ``models`` schema) on images of
    ``input_shape`` (H, W, C) with ``num_classes`` outputs: 2 x the multiply-adds of every matmul and
    convolution, plus attention's QK^T and AV (the module docstring says what is left out), as the
    architecture's module counts them (``models.Architecture.forward_flops``). ``dtype``: the compute dtype,
    where it changes what the model computes (a ViT with ``model.attention=auto`` on a GPU in bfloat16 pads its
    tokens to a multiple of 8 for cuDNN's kernel); None: as in float32."""
    h, w, c = (int(x) for x in input_shape)
    count = models.architecture(model_cfg.arch).forward_flops
    return float(count(model_cfg, (h, w, c), int(num_classes), dtype))


def train_flops(model_cfg, input_shape, num_classes: int, *, dtype=None) -> float:
    """FLOPs of one example in one training step: 3 x ``forward_flops`` (backward = 2 x forward)."""
    return 3.0 * forward_flops(model_cfg, input_shape, num_classes, dtype=dtype)


def xla_flops(compiled) -> float | None:
    """The FLOPs XLA's cost analysis reports for a compiled (or lowered) computation, or None where the
    backend reports none. ``cost_analysis()`` is a dict, or a list of one dict per program in some versions."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return None if flops is None or flops < 0 else float(flops)


# ------------------------------------------------------------------------------------------ achieved
def throughput(images_per_sec: float, num_devices: int, flops_per_example: float,
               peak: float | None) -> dict[str, float]:
    """The per-device figures of ``images_per_sec`` (all devices together) for a model of
    ``flops_per_example`` training FLOPs: ``perf/images_per_sec_per_device``, ``perf/tflops_per_device``
    (achieved model TFLOP/s) and, when ``peak`` (TFLOP/s per device) is known, ``perf/mfu`` (a fraction)."""
    per_device = images_per_sec / num_devices
    tflops = flops_per_example * per_device / 1e12
    out = {"perf/images_per_sec_per_device": per_device, "perf/tflops_per_device": tflops}
    if peak:
        out["perf/mfu"] = tflops / peak
    return out


def describe(flops_per_example: float, peak: float | None, device, precision: str, overridden: bool) -> str:
    """One line for the start of a run: the model's GFLOP per example and the peak MFU is measured against."""
    _, kind = _kind(device)
    line = f"model: {flops_per_example / 1e9:.4g} GFLOP per example per training step (3 x forward)"
    if peak is None:
        return f"{line} | no peak known for {kind or 'this device'} ({precision}): no perf/mfu (set hardware.peak_tflops)"
    source = "hardware.peak_tflops" if overridden else f"{kind}, {precision}"
    return f"{line} | peak {peak:g} TFLOP/s per device ({source}): perf/mfu against it"


# --------------------------------------------------------------------------------------- profiling
def check_profile_steps(steps, total_steps: int) -> tuple[int, int] | None:
    """``trainer.profile_steps`` as (first, last), checked against the run's ``total_steps``; None when off."""
    if steps is None:
        return None
    first, last = (int(s) for s in steps)
    if last > total_steps:
        raise ConfigError("trainer.profile_steps", [first, last],
                          f"this run has {total_steps} steps; give [first, last] with last <= {total_steps}")
    return first, last


__all__ = ["PEAK_TFLOPS", "check_profile_steps", "describe", "forward_flops", "peak_tflops", "throughput",
           "train_flops", "xla_flops"]
