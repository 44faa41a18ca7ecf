"""The hardware-cost package: FLOPs, training FLOPs, sizes, latency, energy, export.

Hand-checked numbers wherever possible; latency measurements are kept tiny (few repeats,
small batches) so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.cost import cost_report
from prunelab.cost.energy import PJ_DRAM_READ_32, energy_pj, energy_report
from prunelab.cost.export import (
    export_all,
    load_sparse_checkpoint,
    read_sparse_checkpoint,
)
from prunelab.cost.flops import LayerFlops, inference_report, layer_flops, sparse_forward_flops
from prunelab.cost.latency import (
    SparseLinear,
    build_sparse_model,
    compact_linear_chain,
    measure_latency,
    peak_memory_mb,
)
from prunelab.cost.size import size_report
from prunelab.cost.training import (
    dense_training_flops,
    segments_from_history,
    training_flops,
    training_flops_x_dense,
)
from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.models import MLP, LeNet300_100, ResNet18, prunable_parameters
from prunelab.sparsity.engine import SparsityEngine

LENET_SHAPE = (1, 28, 28)
LENET_MACS = 784 * 300 + 300 * 100 + 100 * 10  # 266,200


def magnitude_masks(model: nn.Module, density: float) -> dict[str, torch.Tensor]:
    """Per layer, keep the round(density * numel) largest |w| (uniform sparsity)."""
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = round(density * p.numel())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.topk(p.detach().abs().flatten(), keep).indices] = True
        masks[name] = flat.view_as(p)
    return masks


def masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return model.eval()


@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return LeNet300_100(LENET_SHAPE, 10)


# -- FLOPs -----------------------------------------------------------------------------------


def test_lenet_dense_macs_are_exact(lenet):
    lf = layer_flops(lenet, LENET_SHAPE)
    assert lf.macs == {
        "layers.0.weight": 784 * 300,
        "layers.1.weight": 300 * 100,
        "head.weight": 100 * 10,
    }
    assert sum(lf.macs.values()) == LENET_MACS == 266_200
    assert lf.other == 0 and lf.total == 2 * LENET_MACS  # FLOPs = 2 x MACs
    assert lf.activations["layers.0.weight"] == (784, 300)


def test_lenet_uniform_90_percent_sparse_macs(lenet):
    lf = layer_flops(lenet, LENET_SHAPE)
    report = inference_report(lf, dict.fromkeys(lf.layers, 0.1))
    assert report["macs_prunable_sparse"] == pytest.approx(26_620)
    assert report["macs_infer_sparse"] == pytest.approx(26_620)
    assert report["macs_infer_dense"] == LENET_MACS
    assert report["theoretical_speedup"] == pytest.approx(10.0)
    # Layers left out are dense.
    only_first = sparse_forward_flops(lf, {"layers.0.weight": 0.1})
    assert only_first == pytest.approx(2 * (78_400 * 0.3 + 30_000 + 1_000))


def test_resnet18_imagenet_gmacs():
    model = ResNet18((3, 224, 224), 1000, cifar_stem=False)
    lf = layer_flops(model, (3, 224, 224))
    gmacs = lf.total / 2 / 1e9
    assert gmacs == pytest.approx(1.82, rel=0.02)
    assert len(lf.layers) == 21  # 20 convs + fc
    assert lf.macs["fc.weight"] == 512 * 1000
    assert lf.macs["conv1.weight"] == 112 * 112 * 64 * 3 * 7 * 7


class _ConvPlusExtra(nn.Module):
    """A conv, a linear, and a second linear that is not declared prunable (-> 'other')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.extra = nn.Linear(6, 3)

    def prunable_parameters(self):
        return {"conv.weight": self.conv.weight, "fc.weight": self.fc.weight}

    def forward(self, x):
        return self.extra(self.fc(F.relu(self.conv(x)).flatten(1)))


def test_conv_flops_and_other_are_attributed():
    lf = layer_flops(_ConvPlusExtra(), (2, 5, 5))
    assert lf.macs == {"conv.weight": 5 * 5 * 4 * 2 * 3 * 3, "fc.weight": 100 * 6}
    assert lf.other == 2 * 6 * 3
    assert lf.total == 2 * (1800 + 600 + 18)
    # 'other' is never scaled by a density.
    assert sparse_forward_flops(lf, {"conv.weight": 0.0, "fc.weight": 0.0}) == 36


def test_flops_bad_input_is_one_line_config_error(lenet):
    with pytest.raises(ConfigError, match="input_shape"):
        layer_flops(lenet, (0, 28))
    with pytest.raises(ConfigError, match="cannot run an input"):
        layer_flops(lenet, (3, 5))
    lf = layer_flops(lenet, LENET_SHAPE)
    with pytest.raises(ConfigError, match="not prunable"):
        sparse_forward_flops(lf, {"nope.weight": 0.5})
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        sparse_forward_flops(lf, {"head.weight": 1.5})


# -- training FLOPs --------------------------------------------------------------------------

# Hand-checkable layer FLOPs: f_D = 1250; f_S(d) = 50 + 1000 d_a + 200 d_b.
LF = LayerFlops(layers={"a": 1000.0, "b": 200.0}, other=50.0, total=1250.0)


def test_dense_training_is_three_forward_passes():
    segments = [(100, {"a": 1.0, "b": 1.0}, 0)]
    flops = training_flops(LF, segments, samples_per_step=8, accounting="dense")
    assert flops == 3 * 1250 * 8 * 100 == dense_training_flops(LF, 8, 100)
    assert training_flops_x_dense(flops, LF, 8, 100) == 1.0
    # 'dense' always costs f_D, whatever densities are passed.
    assert training_flops(LF, [(100, {"a": 0.1}, 0)], 8, "dense") == flops


def test_rigl_history_matches_appendix_h_by_hand():
    d0, d1, d2 = {"a": 0.1, "b": 0.5}, {"a": 0.2, "b": 0.5}, {"a": 0.3, "b": 0.25}
    history = [
        {"step": 0, "densities": d0, "update": False},
        {"step": 10, "densities": d1, "update": True},
        {"step": 20, "densities": d2, "update": True},
    ]
    segments = segments_from_history(history, total_steps=50)
    # Steps 0..10 under d0 (step 10 is an update), 11..20 under d1 (20 an update), 21..49 d2.
    assert [(n, u) for n, _, u in segments] == [(11, 1), (10, 1), (29, 0)]
    f_d = 1250.0
    f0, f1, f2 = 50 + 100 + 100, 50 + 200 + 100, 50 + 300 + 50  # 250, 350, 400
    by_hand = 4 * (
        (10 * 3 * f0 + 2 * f0 + f_d) + (9 * 3 * f1 + 2 * f1 + f_d) + 29 * 3 * f2
    )  # ordinary step 3 f_S, update step 2 f_S + f_D
    assert training_flops(LF, segments, 4, "rigl") == by_hand
    # The same history under SET (random regrowth) costs 3 f_S on every step.
    assert training_flops(LF, segments, 4, "set") == 4 * 3 * (11 * f0 + 10 * f1 + 29 * f2)


def test_rigl_average_formula_with_update_every():
    dt, f_s, f_d = 4, 50 + 100 + 20, 1250  # densities a=0.1, b=0.1
    d = {"a": 0.1, "b": 0.1}
    averaged = training_flops(LF, [(50, d, None)], 1, "rigl", update_every=dt)
    assert averaged == pytest.approx(50 * (3 * f_s * dt + 2 * f_s + f_d) / (dt + 1))
    exact = training_flops(LF, [(50, d, 10)], 1, "rigl")  # 50 steps = 10 cycles of ΔT + 1
    assert exact == pytest.approx(averaged)
    with pytest.raises(ConfigError, match="update_every"):
        training_flops(LF, [(50, d, None)], 1, "rigl")


def test_snfs_gradual_and_one_shot():
    d = {"a": 0.1, "b": 0.1}
    f_s, f_d = 170.0, 1250.0
    assert training_flops(LF, [(10, d, 0)], 2, "snfs") == 2 * 10 * (2 * f_s + f_d)
    # One-shot at step 49 of 100: steps 0..49 dense, 50..99 sparse.
    history = [
        {"step": 0, "densities": {"a": 1.0, "b": 1.0}},
        {"step": 49, "densities": d},
    ]
    segments = segments_from_history(history, 100)
    assert [n for n, _, _ in segments] == [50, 50]
    assert training_flops(LF, segments, 1, "one_shot") == 3 * (50 * f_d + 50 * f_s)
    assert training_flops(LF, segments, 1, "gradual") == 3 * (50 * f_d + 50 * f_s)


def test_history_errors():
    d = {"a": 1.0}
    with pytest.raises(ConfigError, match="empty"):
        segments_from_history([], 10)
    with pytest.raises(ConfigError, match="outside"):
        segments_from_history([{"step": 0, "densities": d}, {"step": 10, "densities": d}], 10)
    with pytest.raises(ConfigError, match="before"):
        segments_from_history(
            [{"step": 5, "densities": d}, {"step": 7, "densities": d}, {"step": 6, "densities": d}],
            10,
        )
    with pytest.raises(ConfigError, match="initial masks"):
        segments_from_history([{"step": 0, "densities": d, "update": True}], 10)
    with pytest.raises(ConfigError, match="accounting"):
        training_flops(LF, [(1, d, 0)], 1, "magic")
    with pytest.raises(ConfigError, match="samples_per_step"):
        training_flops(LF, [(1, d, 0)], 0, "dense")


def test_segments_from_a_real_rigl_engine_history():
    torch.manual_seed(0)
    model = MLP((12,), 3, hidden=(16,))
    method = build_method(
        "rigl",
        0.8,
        distribution={"name": "uniform"},
        schedule={"kind": "prune_grow", "update_every": 3, "drop_fraction": 0.3, "end": 0.75},
    )
    engine = SparsityEngine(model, prunable_parameters(model), method, seed=0)
    steps = 16
    engine.setup(total_steps=steps, steps_per_epoch=steps)
    engine.initialize()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(optimizer)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    for step in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        engine.before_optimizer_step(step, optimizer)
        optimizer.step()
    assert engine.n_updates == 3  # steps 3, 6, 9 (< 0.75 * 16 = 12)
    segments = segments_from_history(engine.history, steps)
    assert sum(n for n, _, _ in segments) == steps
    assert sum(u for _, _, u in segments) == engine.n_updates
    lf = layer_flops(model, (12,))
    f_d = lf.total
    f_s = sparse_forward_flops(lf, engine.history[-1]["densities"])
    expected = 5 * (3 * f_s * (steps - 3) + 3 * (2 * f_s + f_d))
    assert training_flops(lf, segments, 5, "rigl") == pytest.approx(expected)
    report = cost_report(
        model,
        engine.masks,
        (12,),
        history=engine.history,
        total_steps=steps,
        samples_per_step=5,
        method_name=method.name,
        measure_latency=False,
    )
    assert report["flops_train"] == pytest.approx(expected)
    assert report["flops_train_x_dense"] == pytest.approx(expected / (3 * f_d * 5 * steps))


# -- sizes -----------------------------------------------------------------------------------


def test_sizes_by_hand():
    model = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(2, 2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(torch.tensor([1.0, 0.0, 2.0]))  # one zero bias
        model[1].weight.fill_(2.0)
    mask0 = torch.zeros(3, 4, dtype=torch.bool)
    mask0[0, :2] = True
    mask0[2, 1:] = True  # nnz 5
    mask1 = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask1[1, 0, 0, 0] = True  # nnz 1, matrix 2 x 8
    masks = {"0.weight": mask0, "1.weight": mask1}
    r = size_report(model, masks)
    assert r["params_total"] == 12 + 3 + 16 == 31
    assert r["params_nonzero"] == 5 + 2 + 1 == 8
    assert r["compression_ratio"] == 31 / 8
    assert r["bytes_dense_fp32"] == 4 * 31
    assert r["bytes_csr"] == (8 * 5 + 4 * 4) + (8 * 1 + 4 * 3) + 4 * 3  # + dense bias
    assert r["bytes_bitmask"] == (2 + 4 * 5) + (2 + 4 * 1) + 4 * 3
    assert r["bytes_int8_sparse"] == (5 + 4 + 4 * 5 + 4 * 4) + (1 + 4 + 4 + 4 * 3) + 4 * 3


def test_sizes_of_lenet_at_90_percent(lenet):
    masks = magnitude_masks(lenet, 0.1)
    r = size_report(masked(lenet, masks), masks)
    assert r["params_prunable_nonzero"] == 26_620
    assert r["params_total"] == 266_610
    assert r["bytes_csr"] == 8 * 26_620 + 4 * (301 + 101 + 11) + 4 * 410


# -- latency ---------------------------------------------------------------------------------


def test_sparse_model_matches_masked_model(lenet):
    masks = magnitude_masks(lenet, 0.1)
    sparse = build_sparse_model(lenet, masks)
    assert all(isinstance(m, SparseLinear) for m in (*sparse.layers, sparse.head))
    assert isinstance(lenet.head, nn.Linear)  # the original is untouched
    ref = masked(lenet, masks)
    x = torch.randn(5, *LENET_SHAPE)
    with torch.no_grad():
        assert torch.allclose(sparse(x), ref(x), atol=1e-5)
        assert torch.allclose(sparse(x[:1]), ref(x[:1]), atol=1e-5)
    # Dense enough layers stay dense.
    assert isinstance(build_sparse_model(lenet, masks, max_density=0.05).head, nn.Linear)


def test_sparse_model_keeps_convs_dense():
    torch.manual_seed(0)
    model = _ConvPlusExtra()
    masks = {n: torch.rand(p.shape) < 0.3 for n, p in model.prunable_parameters().items()}
    sparse = build_sparse_model(model, masks)
    assert isinstance(sparse.conv, nn.Conv2d) and isinstance(sparse.fc, SparseLinear)
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        assert torch.allclose(sparse(x), masked(model, masks)(x), atol=1e-5)


def test_compaction_removes_dead_neurons_and_folds_constants():
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=(8, 5))
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    masks = {n: m for n, m in masks.items() if n.endswith("weight")}
    masks["layers.0.weight"][[1, 4]] = False  # rows: constant outputs relu(b), folded
    masks["layers.1.weight"][:, 6] = False  # column: hidden unit 6 of layer 0 unused
    masks["head.weight"][:, 2] = False  # column: hidden unit 2 of layer 1 unused
    with torch.no_grad():
        model.layers[0].bias[1] = 0.7  # relu(0.7) = 0.7 flows on as a constant
        model.layers[0].bias[4] = -0.3  # relu(-0.3) = 0
    compact = compact_linear_chain(model, masks)
    linears = [m for m in compact if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(5, 6), (4, 5), (3, 4)]
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert torch.allclose(compact(x), masked(model, masks)(x), atol=1e-5)


def test_compaction_only_for_linear_chains():
    assert compact_linear_chain(_ConvPlusExtra()) is None
    assert compact_linear_chain(MLP((6,), 3, hidden=(8, 8), residual=True)) is None
    chain = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    assert compact_linear_chain(chain) is not None


def test_measure_latency_tiny(lenet):
    out = measure_latency(lenet, LENET_SHAPE, batch_sizes=(1, 4), repeats=2, min_block_s=1e-4)
    assert set(out) == {"b1", "b4"}
    for stats in out.values():
        assert stats["latency_ms"] > 0 and stats["latency_ms_iqr"] >= 0
        assert stats["peak_tensor_alloc_mb"] > 0
    assert lenet.training  # mode restored
    with pytest.raises(ConfigError):
        measure_latency(lenet, LENET_SHAPE, batch_sizes=(0,))


def test_peak_tensor_memory_by_hand(lenet):
    lenet.eval()
    x = torch.randn(256, *LENET_SHAPE)
    with torch.inference_mode():
        field, mb = peak_memory_mb(lambda: lenet(x), torch.device("cpu"))
    # At the peak the 256 x 300 pre-activation and its ReLU output are alive together.
    assert field == "peak_tensor_alloc_mb"
    assert mb * 2**20 == 2 * 256 * 300 * 4


# -- energy ----------------------------------------------------------------------------------


def test_energy_by_hand():
    parts = energy_pj(macs=10, weight_bytes=8, activation_elements=3)
    assert parts["compute"] == pytest.approx(10 * (3.7 + 0.9))
    assert parts["weights"] == 2 * PJ_DRAM_READ_32 == 1280
    assert parts["activations"] == 15
    assert parts["total"] == pytest.approx(46 + 1280 + 15)
    assert energy_pj(10, 8, 3, batch_size=2)["weights"] == 640
    lf = LayerFlops(layers={"a": 20.0}, other=0.0, total=20.0, activations={"a": (2, 1)})
    r = energy_report(lf, 10, 1, 8, 4)
    assert r["energy_uj_estimate_dense"] == pytest.approx((46 + 1280 + 15) * 1e-6)
    assert r["energy_uj_estimate_sparse"] == pytest.approx((4.6 + 640 + 15) * 1e-6)


# -- export ----------------------------------------------------------------------------------


def test_export_all_reloads_identically(lenet, tmp_path):
    onnx = pytest.importorskip("onnx")
    masks = magnitude_masks(lenet, 0.1)
    paths = export_all(lenet, masks, LENET_SHAPE, tmp_path)
    ref = masked(lenet, masks)
    x = torch.randn(3, *LENET_SHAPE)
    with torch.no_grad():
        expected = ref(x)
        dense = LeNet300_100(LENET_SHAPE, 10).eval()
        dense.load_state_dict(torch.load(paths["state_dict"], weights_only=True))
        assert torch.equal(dense(x), expected)
        sparse = load_sparse_checkpoint(paths["sparse"], LeNet300_100(LENET_SHAPE, 10)).eval()
        assert torch.equal(sparse(x), expected)
    _, read_masks = read_sparse_checkpoint(paths["sparse"])
    assert all(torch.equal(read_masks[n], masks[n]) for n in masks)
    ratio = paths["state_dict"].stat().st_size / paths["sparse"].stat().st_size
    assert ratio >= 5, ratio
    model = onnx.load(str(paths["onnx"]))
    onnx.checker.check_model(model, full_check=True)
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(paths["onnx"]))
        run = lambda feed: session.run(None, feed)[0]  # noqa: E731
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
        run = lambda feed: evaluator.run(None, feed)[0]  # noqa: E731
    name = model.graph.input[0].name
    got = run({name: x.numpy()})  # batch 3: the batch dimension is dynamic
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-5)


def test_sparse_checkpoint_errors(lenet, tmp_path):
    masks = magnitude_masks(lenet, 0.1)
    from prunelab.cost.export import save_sparse_checkpoint

    path = save_sparse_checkpoint(lenet, masks, tmp_path / "s.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        load_sparse_checkpoint(path, MLP(LENET_SHAPE, 10, hidden=(30,)))
    with pytest.raises(ConfigError, match="no sparse checkpoint"):
        load_sparse_checkpoint(tmp_path / "missing.pt", lenet)
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a prunelab sparse checkpoint"):
        load_sparse_checkpoint(tmp_path / "other.pt", lenet)


# -- the report ------------------------------------------------------------------------------


def test_cost_report_keys_and_consistency(lenet):
    masks = magnitude_masks(lenet, 0.1)
    masked(lenet, masks)
    r = cost_report(
        lenet,
        masks,
        LENET_SHAPE,
        total_steps=100,
        samples_per_step=10,
        method_name="set",
        latency_batch_sizes=(1, 8),
        latency_repeats=2,
    )
    json.dumps(r)
    assert r["macs_infer_sparse"] == pytest.approx(26_620)
    assert r["theoretical_speedup"] == pytest.approx(10.0)
    assert r["compression_ratio"] == pytest.approx(266_610 / 27_030)
    assert r["flops_train_x_dense"] == pytest.approx(0.1)
    assert r["bytes_bitmask"] < r["bytes_csr"] < r["bytes_dense_fp32"]
    assert r["energy_uj_estimate_sparse"] < r["energy_uj_estimate_dense"]
    for variant in ("dense", "masked", "sparse", "compact"):
        for batch in ("b1", "b8"):
            assert r[f"latency_ms/{variant}/{batch}"] > 0
            assert r[f"peak_tensor_alloc_mb/{variant}/{batch}"] > 0
    with pytest.raises(ConfigError, match="history"):
        cost_report(lenet, masks, LENET_SHAPE, None, 10, 1, "gmp", measure_latency=False)
    with pytest.raises(ConfigError, match="known methods"):
        cost_report(lenet, masks, LENET_SHAPE, None, 10, 1, "magic", measure_latency=False)


def test_cost_report_dense_without_masks(lenet):
    r = cost_report(lenet, None, LENET_SHAPE, measure_latency=False)
    assert r["theoretical_speedup"] == 1.0 and r["compression_ratio"] == 1.0
    assert r["bytes_dense_fp32"] == 4 * 266_610
    assert "flops_train" not in r and not any(k.startswith("latency") for k in r)
    assert math.isclose(r["density_prunable"], 1.0)


# -- honest labels ---------------------------------------------------------------------------


class _FunctionalFc(nn.Module):
    """A prunable Linear whose weight is used through ``F.linear`` outside the module call,
    so the FLOP counter attributes its FLOPs to the root module, not to ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.linear(x, self.fc.weight, self.fc.bias))


def test_prunable_layer_without_flops_is_an_error():
    with pytest.raises(ValueError, match=r"'fc\.weight'") as err:
        layer_flops(_FunctionalFc(), (6,))
    assert "\n" not in str(err.value)


def test_dense_latency_variant_times_a_dense_model(lenet, monkeypatch):
    from prunelab.cost import latency

    masks = magnitude_masks(lenet, 0.1)
    masked(lenet, masks)
    timed: dict[str, nn.Module] = {}

    def fake_measure(net, input_shape, batch_sizes, repeats, min_block_s=0.01):
        timed[f"v{len(timed)}"] = net
        return {f"b{b}": {"latency_ms": 1.0} for b in batch_sizes}

    monkeypatch.setattr(latency, "measure_latency", fake_measure)
    out = latency.latency_report(lenet, masks, LENET_SHAPE, (1,), repeats=1)
    assert out["latency_ms/dense/b1"] == 1.0
    dense = dict(timed["v0"].named_parameters())  # the first variant timed is 'dense'
    for name, mask in masks.items():
        w, kept = dense[name], lenet.get_parameter(name)[mask]
        assert bool((w != 0).all()), name  # no pruned zeros left in the dense model
        assert torch.equal(w[mask], kept)  # surviving weights unchanged
        refill = w[~mask]
        assert 0.5 < float(refill.std() / kept.std()) < 2.0, name
    assert bool((lenet.get_parameter("head.weight")[~masks["head.weight"]] == 0).all())


def test_latency_report_records_threads_and_load(lenet):
    r = cost_report(
        lenet,
        None,
        LENET_SHAPE,
        latency_batch_sizes=(1,),
        latency_repeats=1,
        latency_under_load=True,
    )
    assert r["latency_threads"] == torch.get_num_threads()
    assert r["latency_under_load"] is True
    r = cost_report(lenet, None, LENET_SHAPE, measure_latency=False)
    assert "latency_threads" not in r and "latency_under_load" not in r
