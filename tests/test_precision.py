"""Mixed precision and channels-last (``base.precision``, ``base.channels_last``;
:mod:`sparse_core.precision`): bf16 trains and resumes, everything stored stays float32, fp16's
loss scaling skips overflowed steps without hiding real divergence, and the settings are part
of the fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sparse_core.artifacts import load_checkpoint
from sparse_core.config import ConfigError, DSTSection, OptimSection, Params, PruningSection
from sparse_core.engine import NonFiniteError, fit, predict, training_step
from sparse_core.methods import create_method
from sparse_core.precision import FP32, Precision
from tests.conftest import TinyNet, make_split
from tests.test_engine import TRANSFORM

OPTIM = OptimSection(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
BF16 = Precision("bf16", channels_last=True)


def _run(run_dir, method_name, precision, stop_after=None, epochs=3, device="cpu"):
    torch.manual_seed(0)
    model = TinyNet().to(device)
    train, val = make_split(96, seed=1), make_split(32, seed=2)
    steps = -(-len(train) // OPTIM.batch_size) * epochs
    method = create_method(
        method_name, model, steps, PruningSection(sparsity=0.8, update_period=4), DSTSection(sparsity=0.8, update_period=4),
        seed=3, epochs=epochs,
    )  # fmt: skip
    fit(
        model, method, train, val, TRANSFORM, OPTIM, epochs=epochs, run_dir=run_dir, seed=7, device=torch.device(device),
        fingerprint="fp", progress=False, stop_after_epoch=stop_after, precision=precision,
    )  # fmt: skip
    return model, method


@pytest.mark.parametrize("method_name", ["dpf", "rigl"])
def test_bf16_trains_resumes_and_keeps_float32_state(tmp_path, method_name):
    full, full_method = _run(tmp_path / "full", method_name, BF16)
    _run(tmp_path / "killed", method_name, BF16, stop_after=1)
    resumed, resumed_method = _run(tmp_path / "killed", method_name, BF16)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    assert full_method.events == resumed_method.events and full_method.events
    # Master weights, masks, DPF's dense copy and the optimizer state stay float32 (or bool).
    ckpt = load_checkpoint(tmp_path / "full" / "last.pt")
    floats = [t for t in ckpt["model"].values() if t.is_floating_point()]
    floats += [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()]
    floats += [t for t in getattr(full_method, "dense", {}).values()] if hasattr(full_method, "dense") else []
    assert floats and all(t.dtype == torch.float32 for t in floats)
    assert all(m.dtype in (torch.bool, torch.float32) for m in full_method.masks.masks.values())
    # Parameters keep the standard layout (only the inputs are channels-last).
    assert all(p.is_contiguous() for p in full.parameters())
    # bf16 really ran: the weights differ from an fp32 run of the same seed.
    fp32, _ = _run(tmp_path / "fp32", method_name, FP32)
    assert not torch.equal(fp32.fc.weight, full.fc.weight)
    # bf16 stays close to fp32 where both keep a connection. A DST topology update ranks
    # gradients, and bf16 rounding may flip a near-tie (here, on the AVX2-only CI machine, rigl
    # keeps 38 of its 39 fc connections in both runs; elsewhere all 39): the masks agree on
    # nearly every active position, not necessarily on all.
    both = (fp32.fc.weight != 0) & (full.fc.weight != 0)
    assert both.sum() >= 0.9 * (fp32.fc.weight != 0).sum(), "bf16 moved the topology, not only the values"
    assert torch.allclose(fp32.fc.weight[both], full.fc.weight[both], atol=0.05), "bf16 must stay close to fp32"


def test_bf16_activations_and_channels_last_layout():
    """With 3-channel inputs the convolutions compute in channels-last (NHWC) and bf16. (With
    one channel the two layouts coincide and PyTorch keeps NCHW; see sparse_core.precision.)"""
    from sparse_core.data.loader import BatchTransform, Split

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(3)).eval()
    seen = {}
    model[2].register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype, cl=o.is_contiguous(memory_format=torch.channels_last)))
    split = Split(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    transform = BatchTransform([0.5] * 3, [0.25] * 3)
    logits = predict(model, split, transform, 8, torch.device("cpu"), BF16)
    assert seen == {"dtype": torch.bfloat16, "cl": True}
    assert logits.dtype == torch.float32
    predict(model, split, transform, 8, torch.device("cpu"), FP32)
    assert seen == {"dtype": torch.float32, "cl": False}
    assert all(p.is_contiguous() for p in model.parameters())


def _step(model, scaler):
    method = create_method("dense", model, 10, PruningSection())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    split = make_split(16)
    x = (split.images.float() - 128) / 64
    return training_step(model, method, opt, x, split.labels, 0, precision=FP32, scaler=scaler)


def test_scaled_overflow_skips_the_step_and_lowers_the_scale(tiny_net):
    before = {k: v.clone() for k, v in tiny_net.state_dict().items() if v.is_floating_point()}
    # A large gradient (x 2**100) under a loss scale of 2**100 overflows float32: the step is
    # skipped and the scale halved, not an error.
    hook = tiny_net.fc.weight.register_hook(lambda g: g * 2.0**100)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    _step(tiny_net, scaler)
    hook.remove()
    assert scaler.get_scale() == 2.0**99
    for k, v in before.items():
        if "running" not in k:  # BN's running statistics move in the forward pass
            assert torch.equal(tiny_net.state_dict()[k], v), k
    # A normal scale steps.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    _step(tiny_net, scaler)
    assert not torch.equal(tiny_net.fc.weight, before["fc.weight"])


def test_scaled_non_finite_loss_is_an_error_whatever_the_scale(tiny_net):
    with torch.no_grad():
        tiny_net.fc.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        _step(tiny_net, torch.amp.GradScaler("cpu", init_scale=2.0**16))


def test_scaled_non_finite_gradient_at_scale_one_is_an_error(tiny_net):
    """At a scale of 1 the loss scale cannot have caused the overflow: divergence, reported."""
    tiny_net.fc.weight.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient
    with pytest.raises(NonFiniteError, match="non-finite gradient.*loss scale 1"):
        _step(tiny_net, torch.amp.GradScaler("cpu", init_scale=1.0))
    tiny_net.fc.weight.grad = None
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    _step(tiny_net, scaler)  # above 1: an overflow, skipped
    assert scaler.get_scale() == 4.0


def test_precision_values_and_devices():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Precision("fp16", device_type="cpu")
    with pytest.raises(ValueError, match="one of fp32, bf16, fp16"):
        Precision("fp8")
    assert not FP32.grad_scaler().is_enabled()
    x = torch.zeros(2, 3, 4, 4)
    assert Precision("fp32", channels_last=True).inputs(x).is_contiguous(memory_format=torch.channels_last)
    assert FP32.inputs(x) is x


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_and_keeps_the_setting(monkeypatch, native):
    import warnings
    from types import SimpleNamespace

    from sparse_core import precision as precision_module

    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: native)
    base = SimpleNamespace(precision="bf16", channels_last=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = Precision.of(base, torch.device("cpu"))
        Precision.of(SimpleNamespace(precision="fp32", channels_last=False), torch.device("cpu"))
    assert got.name == "bf16"
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning) and "no fast bf16 kernels" in str(w.message)]
    assert len(slow) == (0 if native else 1), [str(w.message) for w in caught]


@pytest.mark.parametrize("flags", ["fpu avx2 avx512_bf16", "fpu avx2 amx_bf16 amx_tile", "fpu avx2 avx512f", None])
def test_native_bf16_falls_back_to_the_cpu_flags_without_torchs_private_probes(tmp_path, monkeypatch, flags):
    """torch.cpu._is_avx512_bf16_supported and _is_amx_tile_supported are private: a torch
    without them must not turn every bf16 stage into an AttributeError."""
    from sparse_core import precision as precision_module

    native_here = precision_module.native_bf16_cpu()
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    read_flags = precision_module._cpuinfo_flags
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda path=str(cpuinfo): read_flags(path))
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert precision_module.native_bf16_cpu() == (flags is not None and "bf16" in flags)
    monkeypatch.undo()
    assert precision_module.native_bf16_cpu() == native_here
    if Path("/proc/cpuinfo").exists():  # torch's probes and the kernel's flags agree on this machine
        assert native_here == bool(precision_module._cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})


def test_config_refuses_fp16_on_cpu_and_fingerprints_precision(default_params_dict):
    d = default_params_dict
    base = Params.model_validate(d)
    with pytest.raises((ConfigError, ValueError), match="fp16 needs a CUDA device"):
        Params.model_validate({**d, "base": {**d["base"], "device": "cpu", "precision": "fp16"}})
    for change in ({"precision": "bf16"}, {"channels_last": True}):
        other = Params.model_validate({**d, "base": {**d["base"], **change}})
        assert other.fingerprint("base") != base.fingerprint("base"), change


def test_stage_refuses_fp16_without_cuda(tmp_path, default_params_dict):
    """``device: auto`` passes validation; the stage refuses fp16 on CPU before touching the run
    folder (the device is given, so this holds on machines with CUDA too)."""
    from sparse_core.jobs.rundirs import precision_of

    d = default_params_dict
    params = Params.model_validate({**d, "base": {**d["base"], "device": "auto", "precision": "fp16"}})
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        precision_of(params, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs CUDA")
def test_fp16_trains_and_resumes_on_cuda(tmp_path):
    fp16 = Precision("fp16", device_type="cuda")
    full, _ = _run(tmp_path / "full", "rigl", fp16, device="cuda")
    _run(tmp_path / "killed", "rigl", fp16, stop_after=1, device="cuda")
    resumed, _ = _run(tmp_path / "killed", "rigl", fp16, device="cuda")
    assert load_checkpoint(tmp_path / "full" / "last.pt")["scaler"]["scale"] > 0
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_loss_scale_is_checkpointed_and_resumed(tmp_path, monkeypatch):
    """fp16's scaler state (scale, growth tracker) survives a kill: exercised on CPU with an
    enabled scaler, since fp16 autocast itself needs CUDA."""
    monkeypatch.setattr(Precision, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=5))
    _run(tmp_path / "full", "rigl", FP32)
    _run(tmp_path / "killed", "rigl", FP32, stop_after=1)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["scaler"]["scale"] == 8.0  # 6 steps: grown once
    _run(tmp_path / "killed", "rigl", FP32)
    full, resumed = (load_checkpoint(tmp_path / r / "last.pt")["scaler"] for r in ("full", "killed"))
    assert full == resumed and full["scale"] == 32.0  # 18 steps: grown three times


def test_resident_split_is_a_no_op_on_cpu():
    split = make_split(8)
    assert split.resident("cpu") is split


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-resident data needs CUDA")
def test_resident_split_gives_the_same_batches_on_cuda():
    from sparse_core.data.loader import iterate_batches

    split = make_split(40)
    on_gpu = split.resident("cuda")
    assert on_gpu.images.is_cuda
    host = list(iterate_batches(split, 16, TRANSFORM, train=True, seed=3, epoch=1, device="cuda"))
    dev = list(iterate_batches(on_gpu, 16, TRANSFORM, train=True, seed=3, epoch=1, device="cuda"))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(host, dev))


def test_local_pipeline_trains_in_bf16():
    """``local.execution: pipeline`` honours base.precision: each chunk computes in bf16 (its
    weights differ from the fp32 simulation's, though close), activations travel in float32
    and the merged weights are float32."""
    from sparse_core.local.chunk_processes import run_pipeline
    from tests.test_local import _simulate, _spec

    spec = _spec("chunked", steps=4, precision="bf16", channels_last=True)
    trained, info = run_pipeline(spec)
    assert info["steps"] == 4
    reference = _simulate(spec)  # fp32
    state = trained.state_dict()
    weights = [k for k, v in reference.state_dict().items() if v.is_floating_point() and "weight" in k]
    assert all(state[k].dtype == torch.float32 for k in weights)
    # fp32 pipeline vs simulation differ by ~1e-8 here; bf16 by ~5e-4.
    assert max(float((state[k] - reference.state_dict()[k]).abs().max()) for k in weights) > 1e-4
    for k in weights:
        torch.testing.assert_close(state[k], reference.state_dict()[k], rtol=0, atol=0.02, msg=k)
