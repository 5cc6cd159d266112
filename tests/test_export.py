"""Exports of trained runs (sparse_core.export, ``sparseflow export``): the compact network of a
structured run computes the masked model's function (LeNet-5, VGG-style chains and residual
ResNet-20 with every kind of filter mask), the CSR format equals the dense masked model, the
ONNX model equals PyTorch under onnxruntime, and the CLI refuses bad requests clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sparse_core import artifacts
from sparse_core.export import (
    ExportError,
    LayerTiming,
    choose_csr_layers,
    compact_model,
    export_run,
    load_compact,
    load_sparse,
    onnx_runtime_available,
    run_onnx,
    save_compact,
    time_layers,
)
from sparse_core.models import create_model
from sparse_core.sparsity import magnitude_masks, prunable_parameters

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # the bound for compact vs masked (fp32, eval mode)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BN statistics and biases: pruned filters then output nonzero constants
    (BN shift, conv/linear bias), which an exact compaction must fold into the next layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def _model(name: str, shape: tuple[int, int, int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise(create_model(name, in_channels=shape[0], num_classes=10, image_size=shape[1]), seed)


def _filter_masks(model: nn.Module, density: float = 0.5, seed: int = 0, override: dict | None = None) -> dict:
    """Random whole-filter masks of the structured prunable set (classifier dense), applied to
    the weights; ``override`` = ``{weight name: bool keep vector over filters}``."""
    g = torch.Generator().manual_seed(seed)
    params = prunable_parameters(model, False, True)
    masks = {}
    for n, p in params.items():
        keep = torch.rand(p.shape[0], generator=g) < density
        if override and n in override:
            keep = override[n]
        masks[n] = keep.view(-1, *[1] * (p.dim() - 1)).expand_as(p).clone()
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    return masks


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _x(shape, batch: int = 16) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


# ----- compact ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [("lenet5", (1, 28, 28)), ("lenet_300_100", (1, 28, 28)), ("vgg16", (3, 16, 16))])
def test_compact_chain_models_equal_masked_and_are_narrower(name, shape):
    model = _model(name, shape)
    masks = _filter_masks(model)
    compact, arch = compact_model(model, shape)
    x = _x(shape)
    with torch.no_grad():
        assert _close(compact(x), model(x)) <= ATOL
    # Every conv/linear keeps exactly its unpruned filters (the classifier all of its outputs).
    kept = {op["name"] + ".weight": op["out"] for op in arch["layers"] if op["op"] in ("conv", "linear")}
    for n, m in masks.items():
        assert kept[n] == int(m.flatten(1).any(1).sum())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())


def test_compact_folds_the_constant_output_of_pruned_filters():
    """A pruned LeNet-5 filter still outputs relu(bias); dropping it without folding changes
    the logits. Here conv1 keeps 2 of 6 filters and the constant path matters."""
    model = _model("lenet5", (1, 28, 28))
    keep = torch.tensor([True, False, False, True, False, False])
    _filter_masks(model, density=1.0, override={"conv1.weight": keep})
    with torch.no_grad():
        model.conv1.bias.copy_(torch.tensor([0.1, 0.8, 0.5, -0.2, 0.3, 0.9]))
    compact, arch = compact_model(model, (1, 28, 28))
    assert arch["layers"][0]["out"] == 2 and arch["layers"][0]["kept"] == [0, 3]
    x = _x((1, 28, 28))
    with torch.no_grad():
        assert _close(compact(x), model(x)) <= ATOL
        # The folded constants live in conv2's bias: without them the outputs differ.
        compact[3].bias.copy_(model.conv2.bias)
        assert _close(compact(x), model(x)) > 1e-3


def _stage_override(model, stage_channels: dict[int, torch.Tensor]) -> dict:
    """Keep vectors pruning the same stream channels in every writer of a stage (stem / conv2)."""
    out = {}
    blocks = list(model.layers)
    per_stage = len(blocks) // 3
    out["conv1.weight"] = stage_channels[0]
    for b in range(len(blocks)):
        out[f"layers.{b}.conv2.weight"] = stage_channels[b // per_stage]
    return out


def test_compact_resnet20_random_filter_masks_equal_masked():
    shape = (3, 32, 32)
    model = _model("resnet20", shape)
    _filter_masks(model, density=0.5, seed=3)
    compact, arch = compact_model(model, shape)
    x = _x(shape)
    with torch.no_grad():
        assert _close(compact(x), model(x)) <= ATOL
    # The inner convolution of each block keeps exactly its unpruned filters.
    for b, blk in enumerate(model.layers):
        assert arch["blocks"][b]["inner"] == int(blk.conv1.weight.flatten(1).any(1).sum())
    # Every conv still runs through its module call (forward_bn included): FLOPs counters and
    # other forward hooks see all of them.
    from sparse_core.flops import layer_flops

    weights = {f"{n}.weight" for n, m in compact.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(layer_flops(compact, shape)) == weights and any(m.has_const for m in compact.modules() if hasattr(m, "has_const"))


def test_compact_resnet20_prunes_residual_stream_channels_and_whole_inner_convs():
    """Stream channels pruned in the stem and every conv2 of a stage are removed from the whole
    stage; a block whose inner conv is pruned entirely still gives the masked output; channels
    dead in stage 1 and carried by the option-A shortcut into stage 2 are folded as constants."""
    shape = (3, 32, 32)
    model = _model("resnet20", shape, seed=1)
    g = torch.Generator().manual_seed(5)
    stage_keep = {0: torch.rand(16, generator=g) < 0.5, 1: torch.rand(32, generator=g) < 0.5, 2: torch.rand(64, generator=g) < 0.5}
    override = _stage_override(model, stage_keep)
    override["layers.1.conv1.weight"] = torch.zeros(16, dtype=torch.bool)  # a whole inner conv pruned
    override["layers.7.conv1.weight"] = torch.zeros(64, dtype=torch.bool)
    _filter_masks(model, density=0.5, seed=2, override=override)
    compact, arch = compact_model(model, shape)
    x = _x(shape)
    with torch.no_grad():
        assert _close(compact(x), model(x)) <= ATOL
    # Stage 2's stream: its own kept channels plus the stage-1 channels its shortcut carries in
    # (option A pads 8 channels on each side).
    carried2 = {i + 8 for i in torch.nonzero(stage_keep[0]).flatten().tolist()}
    expect2 = sorted(set(torch.nonzero(stage_keep[1]).flatten().tolist()) | carried2)
    assert arch["blocks"][3]["kept"]["stream"] == expect2
    assert arch["stem"]["stream"] == int(stage_keep[0].sum()) < 16
    assert arch["fc"]["in"] < 64
    assert arch["blocks"][1]["inner"] == 1  # one zero filter kept: no layer has width 0


def test_compact_plain_narrow_resnet_halves_every_width():
    """Masks that keep the first half of every layer's filters give the plain narrower network."""
    shape = (3, 32, 32)
    model = _model("resnet20", shape)
    override = {n: torch.arange(p.shape[0]) < p.shape[0] // 2 for n, p in prunable_parameters(model, False, True).items()}
    _filter_masks(model, override=override)
    compact, arch = compact_model(model, shape)
    # Stage 2 keeps channels 0-15: its own 0-7 and stage 1's 0-7, carried to 8-15 by the shortcut.
    assert [b["out"] for b in arch["blocks"]] == [8] * 3 + [16] * 3 + [32] * 3
    assert [b["inner"] for b in arch["blocks"]] == [8] * 3 + [16] * 3 + [32] * 3
    x = _x(shape)
    with torch.no_grad():
        assert _close(compact(x), model(x)) <= ATOL


@pytest.mark.parametrize("hw,stride,kernel,padding", [((32, 32), 1, 3, 1), ((32, 32), 2, 3, 1), ((7, 9), 1, 3, 1),
                                                      ((2, 2), 1, 3, 1), ((3, 3), 1, 5, 2), ((8, 8), 1, 5, 2)])
@pytest.mark.parametrize("mode", ["fp32", "fp32 channels_last", "bf16", "grad"])
def test_const_conv_equals_conv_plus_the_constant_response(hw, stride, kernel, padding, mode):
    """ConstConv2d computes ``conv(x, W) + conv(ones, K)`` (the exact response to removed
    constant channels) at every geometry, with its cached map reused, in channels_last, under
    bf16 autocast and with autograd: borders on all sides, on two sides (stride 2), all border
    (2×2), a kernel wider than the input (3×3 input, 5×5 kernel)."""
    from sparse_core.export import ConstConv2d

    g = torch.Generator().manual_seed(0)
    conv = ConstConv2d(4, 6, kernel, stride, padding, bias=False, const_kernel=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.const_kernel.copy_(torch.randn(conv.const_kernel.shape, generator=g))
    x = torch.randn(3, 4, *hw, generator=g)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x, conv.weight, None, stride, padding) + torch.nn.functional.conv2d(
            torch.ones(1, 1, *hw), conv.const_kernel, None, stride, padding)
    if mode == "fp32 channels_last":
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if mode == "bf16":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        assert float((out.float() - ref).abs().max()) <= 0.05 * float(ref.abs().max())
        return
    if mode == "grad":
        xg = x.clone().requires_grad_()
        out = conv(xg)
        out.sum().backward()  # the in-place border adds keep autograd valid
        assert xg.grad is not None and conv.weight.grad is not None
        out = out.detach()
    else:
        with torch.no_grad():
            out, again = conv(x), conv(x)  # the second call uses the cached split
        assert torch.equal(out, again)
    assert _close(out, ref) <= 1e-5


@pytest.mark.parametrize("mode", ["fp32", "fp32 channels_last", "bf16"])
def test_const_conv_folds_its_map_into_the_following_batchnorm(mode):
    """``forward_bn(x, bn)`` equals ``bn(conv(x))`` in eval mode (the map folded into the shift),
    follows a change of the BN statistics or the kernel made in place after a first call (the
    cache keys on the tensors' versions), and keeps batch statistics in training mode."""
    from sparse_core.export import ConstConv2d

    g = torch.Generator().manual_seed(1)
    conv = ConstConv2d(4, 6, 3, 1, 1, bias=False, const_kernel=True)
    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        for t in (conv.weight, conv.const_kernel, bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(t.shape, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
    bn.eval()
    x = torch.randn(2, 4, 9, 7, generator=g)
    if mode == "fp32 channels_last":
        conv, bn, x = conv.to(memory_format=torch.channels_last), bn, x.contiguous(memory_format=torch.channels_last)
    tol = 0.05 if mode == "bf16" else 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        for _ in range(2):  # computed, then cached
            ref, out = bn(conv(x)).float(), conv.forward_bn(x, bn).float()
            assert _close(out, ref) <= tol * max(1.0, float(ref.abs().max()))
        bn.running_mean.add_(1.0)
        conv.const_kernel.mul_(2.0)
        ref2, out2 = bn(conv(x)).float(), conv.forward_bn(x, bn).float()
    assert _close(out2, ref2) <= tol * max(1.0, float(ref2.abs().max())) and _close(out2, out) > 0.1
    bn.train()
    assert torch.equal(conv.forward_bn(x, bn), bn(conv(x)))  # batch statistics: no folding


def test_compact_resnet_folds_residual_biases_into_bn2():
    """A stream channel that a kept conv2 filter writes takes its residual bias through bn2's
    shift, so masks aligned along the residual stream (a plain narrower network, option-A
    shortcut carrying dead channels) leave no residual-bias pass, and the output is unchanged."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from inference import aligned_masks, resnet20
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    shape = (3, 32, 32)
    for sparsity in (0.5, 0.75):
        model = aligned_masks(resnet20(), sparsity)
        compact, arch = compact_model(model, shape)
        assert not any(b["residual_bias"] for b in arch["blocks"])
        x = _x(shape)
        with torch.no_grad():
            assert _close(compact(x), model(x)) <= ATOL
    # Masks that leave stream channels without a kept conv2 writer still need the pass.
    model = _model("resnet20", shape, seed=1)
    _filter_masks(model, density=0.5, seed=3)
    compact, arch = compact_model(model, shape)
    for b, spec in enumerate(arch["blocks"]):
        if spec["residual_bias"]:
            bias = compact.layers[b].residual_bias
            placed = torch.tensor([q < spec["conv2_out"] for q in spec["place"]])
            assert bool(bias[placed].eq(0).all()) and bool(bias[~placed].ne(0).any())
    assert any(spec["residual_bias"] for spec in arch["blocks"])


def test_compact_save_load_round_trip_is_exact(tmp_path):
    shape = (3, 32, 32)
    model = _model("resnet20", shape)
    _filter_masks(model, seed=4)
    compact, arch = compact_model(model, shape)
    save_compact(compact, arch, tmp_path / "c")
    again = load_compact(tmp_path / "c")
    x = _x(shape)
    with torch.no_grad():
        assert torch.equal(again(x), compact(x))
    assert json.loads((tmp_path / "c" / "arch.json").read_text())["blocks"][0]["inner"] == arch["blocks"][0]["inner"]


def test_compact_refuses_models_without_a_compact_form():
    model = create_model("wrn", in_channels=3, num_classes=10, image_size=16, depth=10, widen=1).eval()
    with pytest.raises(ExportError, match="compact export supports"):
        compact_model(model, (3, 16, 16))


# ----- run folders and the CLI -------------------------------------------------------------------
def _write_run(root: Path, run: str, name: str, model: nn.Module, masks: dict, shape, method: str, granularity: str,
               seed: int = 0) -> Path:
    """A run folder as the train stage writes it (model.safetensors, masks.safetensors,
    config.json) plus a prepared-data file with the metadata the export reads."""
    data = Path("data/prepared/toy/data.parquet")
    if not (root / data).is_file():
        import pandas as pd

        meta = {"channels": str(shape[0]), "height": str(shape[1]), "width": str(shape[2]),
                "classes": json.dumps([str(i) for i in range(10)])}  # fmt: skip
        artifacts.write_parquet(pd.DataFrame({"label": [0]}), root / data, meta)
    folder = root / "runs" / f"s{seed}" / run
    artifacts.save_tensors(model.state_dict(), folder / "model.safetensors")
    if masks:
        artifacts.save_tensors({n: m.to(torch.uint8) for n, m in masks.items()}, folder / "masks.safetensors")
    cfg = {"run": run, "method": method, "data": {"file": str(data)},
           "params": {"model": {"name": name, "kwargs": {}},
                      "train": {"pruning": {"granularity": granularity}}}}  # fmt: skip
    artifacts.write_json(cfg, folder / "config.json")
    return folder



@pytest.fixture
def workspace(tmp_path, monkeypatch, default_params_dict):
    """A project folder with params.yaml (default profile) and three runs of seed 0: ``gmp``
    (structured ResNet-8: residual, with both stage transitions), ``lenet_s (structured LeNet-5), ``dpf`` (unstructured LeNet-5 at 90%)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(default_params_dict))
    res = _model("resnet8", (3, 32, 32))
    _write_run(tmp_path, "gmp", "resnet8", res, _filter_masks(res, seed=7), (3, 32, 32), "gmp", "structured")
    le = _model("lenet5", (3, 32, 32))
    _write_run(tmp_path, "lenet_s", "lenet5", le, _filter_masks(le, seed=8), (3, 32, 32), "dpf", "structured")
    dense = _model("lenet5", (3, 32, 32))
    params = prunable_parameters(dense)
    masks = magnitude_masks({n: p.detach() for n, p in params.items()}, 0.9)
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    _write_run(tmp_path, "dpf", "lenet5", dense, masks, (3, 32, 32), "dpf", "unstructured")
    return tmp_path


def _cli(args: list[str]) -> int:
    from flows.cli import main

    return main(args)


def test_cli_exports_a_structured_run_to_its_folder(workspace):
    assert _cli(["export", "--run", "gmp", "--format", "compact"]) == 0
    out = workspace / "runs" / "s0" / "gmp" / "export" / "compact"
    assert {p.name for p in out.iterdir()} == {"arch.json", "model.safetensors"}
    from sparse_core.export import load_run

    run = load_run(workspace / "runs" / "s0" / "gmp")
    x = _x((3, 32, 32))
    with torch.no_grad():
        assert _close(load_compact(out)(x), run.model(x)) <= ATOL
    arch = json.loads((out / "arch.json").read_text())
    assert arch["source"]["method"] == "gmp" and arch["source"]["max_abs_diff_vs_masked"] <= ATOL


def test_cli_export_to_out_and_seed(workspace, tmp_path):
    assert _cli(["export", "--run", "lenet_s", "--format", "compact", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "arch.json").is_file()
    # --seed 1 looks in runs/s1/, which has no such run.
    assert _cli(["export", "--run", "lenet_s", "--format", "compact", "--seed", "1"]) == 1


def test_cli_refuses_compact_for_an_unstructured_run(workspace, capsys):
    assert _cli(["export", "--run", "dpf", "--format", "compact"]) == 1
    err = capsys.readouterr().err
    assert "'dpf'" in err and "granularity unstructured" in err
    assert not (workspace / "runs" / "s0" / "dpf" / "export").exists()


@pytest.mark.parametrize("run,message", [("nope", "run (in runs/s0) 'nope' is unknown; known: dpf, gmp, lenet_s"),
                                         ("../gmp", "plain name"), ("/etc", "plain name"), ("gmp/../dpf", "plain name"),
                                         ("export", "unknown"), ("", "unknown")])  # fmt: skip
def test_cli_refuses_missing_runs_and_paths(workspace, capsys, run, message):
    assert _cli(["export", "--run", run, "--format", "onnx"]) == 1
    assert message in capsys.readouterr().err


def test_cli_names_a_missing_file_and_an_unknown_format(workspace, capsys):
    (workspace / "runs" / "s0" / "gmp" / "model.safetensors").unlink()
    assert _cli(["export", "--run", "gmp", "--format", "compact"]) == 1
    assert "runs/s0/gmp/model.safetensors: missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _cli(["export", "--run", "gmp", "--format", "zip"])
    assert exc.value.code == 2
    assert "invalid choice: 'zip'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown export format 'zip'"):
        export_run(workspace / "runs" / "s0" / "dpf", "zip")


def test_a_failed_export_keeps_the_previous_one(workspace, monkeypatch):
    assert _cli(["export", "--run", "gmp", "--format", "compact"]) == 0
    out = workspace / "runs" / "s0" / "gmp" / "export" / "compact"
    before = (out / "model.safetensors").read_bytes()

    def broken(obj, dest):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "write_json", broken)
    with pytest.raises(OSError):
        export_run(workspace / "runs" / "s0" / "gmp", "compact")
    assert (out / "model.safetensors").read_bytes() == before and (out / "arch.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["compact"]  # no temporary folder left


# ----- sparse (CSR) ------------------------------------------------------------------------------
def test_sparse_format_equals_dense_masked_model(workspace):
    out = export_run(workspace / "runs" / "s0" / "dpf", "sparse", layers="all")
    spec = json.loads((out / "sparse.json").read_text())
    assert spec["csr_layers"] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    sparse = load_sparse(out)
    from sparse_core.export import CSRConv2d, CSRLinear, load_run

    assert isinstance(sparse.conv2, CSRConv2d) and isinstance(sparse.fc1, CSRLinear)
    # Stored sparsely: only the active weights are in the file.
    tensors = artifacts.load_tensors(out / "model.safetensors")
    run = load_run(workspace / "runs" / "s0" / "dpf")
    assert tensors["fc1.values"].numel() == int(torch.count_nonzero(run.model.fc1.weight))
    x = _x((3, 32, 32))
    with torch.no_grad():
        assert _close(sparse(x), run.model(x)) <= ATOL


def test_sparse_export_measures_each_layer_and_records_the_decision(workspace):
    out = export_run(workspace / "runs" / "s0" / "dpf", "sparse", batch_sizes=(1, 4))
    spec = json.loads((out / "sparse.json").read_text())
    assert {(t["layer"], t["batch"]) for t in spec["timings"]} == {(n, b) for n in ("conv1", "conv2", "fc1", "fc2", "fc3") for b in (1, 4)}
    winners = {t["layer"] for t in spec["timings"]} - {t["layer"] for t in spec["timings"] if t["speedup"] < 1.1}
    assert set(spec["csr_layers"]) == winners
    run_model = load_sparse(out)
    x = _x((3, 32, 32))
    from sparse_core.export import load_run

    with torch.no_grad():
        assert _close(run_model(x), load_run(workspace / "runs" / "s0" / "dpf").model(x)) <= ATOL


def test_csr_is_chosen_only_where_it_wins_at_every_batch_size():
    t = [LayerTiming("a", 1, 2.0, 1.0, 0, 0, 0.1), LayerTiming("a", 256, 2.0, 1.5, 0, 0, 0.1),
         LayerTiming("b", 1, 2.0, 1.0, 0, 0, 0.1), LayerTiming("b", 256, 1.0, 1.0, 0, 0, 0.1)]  # fmt: skip
    assert choose_csr_layers(t) == ["a"]
    assert choose_csr_layers(t, min_speedup=1.5) == []


def test_time_layers_reports_every_layer_and_batch():
    model = _model("lenet5", (1, 28, 28))
    res = time_layers(model, (1, 28, 28), ["fc1", "conv2"], batch_sizes=(2,), rounds=2, min_time_s=0.001)
    assert [(r.layer, r.batch) for r in res] == [("fc1", 2), ("conv2", 2)]
    assert all(r.dense_s > 0 and r.csr_s > 0 for r in res)


# ----- onnx --------------------------------------------------------------------------------------
def test_onnxruntime_is_installed():
    """onnxruntime is a dependency (pyproject.toml): the ONNX checks below must run, not skip."""
    assert onnx_runtime_available()


@pytest.mark.parametrize("run", ["gmp", "dpf"])
def test_onnx_export_equals_pytorch_under_onnxruntime(workspace, run):
    """Structured ResNet-8 (exported as its compact network) and unstructured LeNet-5 (the
    masked network): onnxruntime's logits equal the masked PyTorch model's, at two batch sizes."""
    from sparse_core.export import ONNX_ATOL, load_run

    out = export_run(workspace / "runs" / "s0" / run, "onnx")
    meta = json.loads((out / "onnx.json").read_text())
    assert meta["model"] == ("compact" if run == "gmp" else "masked")
    assert meta["check"]["max_abs_diff_vs_pytorch"] <= ONNX_ATOL
    masked = load_run(workspace / "runs" / "s0" / run).model
    for batch in (1, 5):
        x = _x((3, 32, 32), batch)
        with torch.no_grad():
            ref = masked(x).numpy()
        assert abs(run_onnx(out / "model.onnx", x.numpy()) - ref).max() <= ONNX_ATOL
