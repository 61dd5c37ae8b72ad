"""Engines: one base classifier run by torch (eager, or torch.compile), ONNX Runtime or
OpenVINO, at fp32, bf16 (OpenVINO, on CPUs that have bf16) or int8 (static post-training
quantization, calibrated on training images).

A certificate holds for the function that produced the votes. An fp32 engine computes the
eager model's function up to float rounding (and `auto` keeps one only when its votes equal
eager's on a check batch), so it keeps the model's fingerprint. A bf16 or an int8 model is
another base classifier, as sound as any, with a fingerprint of its own: a memory or a results
file written with it refuses the fp32 model, and the reverse (models/identity.py).

The exported and quantized models, and `auto`'s measured choice, are cached in the engine cache
($DDRS_CACHE, else ~/.cache/ddrs), keyed by the model's fingerprint (and the machine, for
`auto`): every run of a model reuses them."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ddrs.core.experts import Expert, Experts
from ddrs.core.torchutil import eval_mode, is_convolutional, model_device
from ddrs.errors import InputError
from ddrs.models.onnx import OnnxRunner, gives_gradients, run_numpy

ENGINES = ("auto", "eager", "compile", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
RUNTIMES = ("onnxruntime", "openvino")  # the engines that run an exported ONNX file
CALIBRATION_IMAGES = 256  # training images that set int8's activation ranges
CALIBRATION_SIGMAS = (0.12, 0.25, 0.5)  # their noise, when the model has no sigma of its own
CHECK_INPUTS = 256  # auto: the noisy inputs on which an engine's votes must equal eager's
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}


def default_engine() -> str:
    """`auto`, unless $DDRS_ENGINE names another (scripts and test suites that pin one)."""
    engine = os.environ.get("DDRS_ENGINE", "auto")
    if engine not in ENGINES:
        raise InputError(f"DDRS_ENGINE={engine!r}: choose one of {', '.join(ENGINES)}")
    return engine


def check_engine(engine: str, precision: str) -> None:
    """The combinations that exist: bf16 on OpenVINO, int8 on ONNX Runtime or OpenVINO."""
    if engine not in ENGINES:
        raise InputError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and engine not in ("auto", "openvino"):
        raise InputError(
            "--precision bf16 runs on OpenVINO: add --engine openvino (torch's bf16 on a CPU "
            "is about 5x slower than fp32, and ONNX Runtime has no bf16 CPU kernels)"
        )
    if precision == "int8" and engine not in ("auto", *RUNTIMES):
        raise InputError("--precision int8 runs on --engine onnxruntime or --engine openvino")


def installed(engine: str) -> bool:
    try:
        __import__(engine)
    except ImportError:
        return False
    return True


def require(engine: str):
    """The engine's package, or one line naming the extra that installs it."""
    try:
        return __import__(engine)
    except ImportError:
        raise InputError(
            f"--engine {engine} needs {engine}, which is not installed: "
            f"pip install 'ddrs[{EXTRAS[engine]}]'"
        ) from None


class EngineModel(nn.Module):
    """A torch model run by ONNX Runtime or OpenVINO. Gradients (the ascent sigma search)
    go through the eager fp32 model, `base`; votes come from the engine."""

    def __init__(self, base: nn.Module, runner, engine: str, precision: str, identity: str):
        super().__init__()
        self.base = base
        self.runner = runner
        self.engine, self.precision, self.identity = engine, precision, identity
        self.runs_outside_torch = True  # NCHW inputs as they are; torch's noise on one thread

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.base(x)
        return run_numpy(self.runner, x)

    def extra_repr(self) -> str:
        return f"engine={self.engine}, precision={self.precision}"


class OpenVinoRunner:
    """An ONNX file compiled by OpenVINO for the CPU at fp32 or bf16 (an int8 QDQ model runs
    its int8 kernels at either)."""

    def __init__(self, path: Path, precision: str):
        ov = require("openvino")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property(
            "CPU", "OPTIMIZATION_CAPABILITIES"
        ):
            raise InputError(
                "--precision bf16: this CPU has no bf16 instructions; use --precision int8 or fp32"
            )
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        self.compiled = core.compile_model(str(path), "CPU", hint)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return np.array(self.compiled(array)[0], dtype=np.float32)


def engine_of(model: nn.Module) -> tuple[str, str]:
    """(engine, precision) that run `model`."""
    if isinstance(model, EngineModel):
        return model.engine, model.precision
    if hasattr(model, "_orig_mod"):
        return "compile", "fp32"
    if not gives_gradients(model):
        return "onnxruntime", "fp32"  # a user's own .onnx model
    return "eager", "fp32"


def base_of(model: nn.Module) -> nn.Module:
    """The torch model an engine runs (the model itself under eager)."""
    if isinstance(model, EngineModel):
        return model.base
    return getattr(model, "_orig_mod", model)


def with_engine(
    experts: Experts,
    engine: str,
    precision: str,
    input_shape,
    fingerprint: Callable[[nn.Module], str],
    calibration: Callable[[], Tensor] | None = None,
) -> Experts:
    """Every expert's model run by `engine` at `precision` (one per distinct model).
    `calibration` gives int8's training images; `fingerprint` names a model in the cache."""
    check_engine(engine, precision)
    sigmas: dict[int, set[float]] = {}
    for e in experts:
        sigmas.setdefault(id(e.model), set()).add(e.sigma)
    built: dict[int, nn.Module] = {}
    members = []
    for e in experts:
        if id(e.model) not in built:
            own = sigmas[id(e.model)]  # one model at several sigmas calibrates at them all
            sigma = next(iter(own)) if len(own) == 1 else math.nan
            built[id(e.model)] = _run_by(
                e.model, sigma, engine, precision, tuple(input_shape), calibration, fingerprint
            )
        members.append(Expert(e.name, e.source, e.sigma, built[id(e.model)]))
    return Experts(tuple(members))


def _run_by(model, sigma, engine, precision, input_shape, calibration, fingerprint) -> nn.Module:
    if engine in ("eager", "auto") and precision == "fp32" and not gives_gradients(model):
        return model  # a user's .onnx model already runs through ONNX Runtime
    if engine == "eager":
        return model
    if engine == "compile":
        return torch.compile(model)
    if engine == "auto" and model_device(model).type != "cpu":
        return model  # the engines run on the CPU; on a GPU, torch is the engine
    if not gives_gradients(model):  # an OnnxModel inside
        raise InputError(
            "--engine and --precision apply to torch models; an .onnx model (or denoiser) "
            "runs through ONNX Runtime as it is: leave them out"
        )
    if model_device(model).type != "cpu":
        raise InputError(f"--engine {engine} runs on the CPU here: add --device cpu")
    folder = cache_folder(fingerprint(model))
    if engine == "auto" and precision == "fp32":
        engine = auto_engine(model, input_shape, folder)
        if engine == "eager":
            return model
    elif engine == "auto":  # bf16 runs on OpenVINO; int8 on it when installed
        engine = "openvino" if precision == "bf16" or installed("openvino") else "onnxruntime"
    require(engine)
    path = exported(model, input_shape, folder)
    identity = hashlib.sha256(path.read_bytes()).hexdigest()
    if precision == "int8":
        if calibration is None:
            raise InputError(
                f"--precision int8 calibrates on {CALIBRATION_IMAGES} training images: give "
                "--dataset (and --data-root) with a training split"
            )
        path = quantized(path, noisy_calibration(calibration(), sigma), folder)
        identity = hashlib.sha256(path.read_bytes()).hexdigest()
    runner = OpenVinoRunner(path, precision) if engine == "openvino" else None
    runner = runner or OnnxRunner(path.read_bytes(), str(path))
    return EngineModel(model, runner, engine, precision, identity).eval()


def cache_folder(fingerprint: str) -> Path:
    root = Path(os.environ.get("DDRS_CACHE") or Path.home() / ".cache" / "ddrs")
    folder = root / "engines" / fingerprint[:32]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def exported(model: nn.Module, input_shape: tuple, folder: Path) -> Path:
    """The model as an ONNX file (opset 17, any batch size), exported once."""
    path = folder / f"fp32-{'x'.join(map(str, input_shape))}.onnx"
    if path.is_file():
        return path
    partial = path.with_suffix(f".{os.getpid()}.partial")
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on our input-shape guard
        torch.onnx.export(
            model,
            (torch.zeros(1, *input_shape),),
            str(partial),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    os.replace(partial, path)
    return path


def noisy_calibration(images: Tensor, sigma: float) -> Tensor:
    """The calibration images as the model sees them when smoothed: each with Gaussian noise,
    at the expert's sigma, or in turn at each of CALIBRATION_SIGMAS for a model whose sigma
    comes per input (NaN) or that serves several experts."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    levels = list(CALIBRATION_SIGMAS) if math.isnan(sigma) else [sigma]
    scale = torch.tensor([levels[i % len(levels)] for i in range(len(images))])
    return images + noise * scale.view(-1, *([1] * (images.dim() - 1)))


def quantized(fp32_path: Path, calibration: Tensor, folder: Path) -> Path:
    """Static int8 quantization (QDQ, u8 activations, per-channel s8 weights) of the ONNX
    model, calibrated on `calibration`; cached by the scheme and the calibration's digest."""
    digest = hashlib.sha256(calibration.numpy().tobytes()).hexdigest()[:16]
    path = folder / f"int8-u8s8-{fp32_path.stem}-{digest}.onnx"
    if path.is_file():
        return path
    require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.parts = iter(calibration.split(32))

        def get_next(self):
            part = next(self.parts, None)
            return None if part is None else {"input": part.contiguous().numpy()}

    prepared = path.with_suffix(f".{os.getpid()}.prepared")
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        quant_pre_process(str(fp32_path), str(prepared))  # shapes and fusions, as advised
        # unsigned activations, signed weights: the x86 VNNI kernels (ResNet-110 on this CPU:
        # 2.3x fp32 with u8 activations, 0.5x with s8, through ONNX Runtime)
        quantize_static(
            str(prepared), str(partial), Batches(), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
        os.replace(partial, path)
    finally:
        prepared.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return path


def auto_engine(model: nn.Module, input_shape: tuple, folder: Path) -> str:
    """The fastest fp32 engine installed whose votes equal eager's on CHECK_INPUTS noisy
    inputs, measured once per model and machine (cached in `folder`)."""
    record = folder / f"auto-{_machine_key(input_shape)}.json"
    if record.is_file():
        chosen = json.loads(record.read_text())["engine"]
        if chosen == "eager" or installed(chosen):
            return chosen
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(CHECK_INPUTS, *input_shape, generator=generator)
    probe = probe + 0.25 * torch.randn(probe.shape, generator=generator)
    eager_probe = probe
    if probe.dim() == 4 and is_convolutional(model):  # eager as the sampling runs it
        model.to(memory_format=torch.channels_last)
        eager_probe = probe.contiguous(memory_format=torch.channels_last)
    with eval_mode(model), torch.inference_mode():
        reference = model(eager_probe).argmax(1)
        rates = {"eager": _rate(lambda: model(eager_probe))}
    equal = {"eager": True}
    for engine in (e for e in RUNTIMES if installed(e)):
        path = exported(model, input_shape, folder)
        runner = OpenVinoRunner(path, "fp32") if engine == "openvino" else None
        runner = runner or OnnxRunner(path.read_bytes(), str(path))
        equal[engine] = bool((run_numpy(runner, probe).argmax(1) == reference).all())
        rates[engine] = _rate(lambda run=runner: run(probe.numpy()))
    chosen = max((e for e in rates if equal[e]), key=lambda e: rates[e])
    shown = ", ".join(
        f"{e} {rates[e] / rates['eager']:.2f}x" + ("" if equal[e] else " (votes differ)")
        for e in rates
    )
    print(f"engine auto: {chosen} (fp32 over eager: {shown}); cached in {record}")
    partial = record.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps({"engine": chosen, "rates": rates, "equal": equal}))
    os.replace(partial, record)
    return chosen


def _rate(forward: Callable[[], object], repeats: int = 3) -> float:
    """Forward passes per second of the check batch, after one warm-up."""
    forward()
    start = time.perf_counter()
    for _ in range(repeats):
        forward()
    return repeats / (time.perf_counter() - start)


def _machine_key(input_shape: tuple) -> str:
    """This machine for `auto`: its CPU, threads, library versions and the input shape."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0] if names else cpu
    versions = [torch.__version__]
    for engine in RUNTIMES:
        if installed(engine):
            versions.append(f"{engine}={__import__(engine).__version__}")
    text = f"{cpu}|{torch.get_num_threads()}|{versions}|{input_shape}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
