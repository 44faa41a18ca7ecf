"""Pruning at initialisation: GraSP (Wang et al. 2020) and SynFlow (Tanaka et al. 2020).

Pure torch (tiny models on random data through the engine), plus one short end-to-end run
of each method through the real Hydra config and Lightning.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from test_methods import dist, global_topk
from torch import nn

from prunelab.errors import ConfigError
from prunelab.methods import METHODS, build_method
from prunelab.methods.grasp import GraSP
from prunelab.methods.synflow import SynFlow
from prunelab.sparsity.engine import Context, SparsityEngine

FIXED = {"kind": "fixed"}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def mlp(
    widths: list[int], seed: int = 0, bias: bool = True, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def batches_for(widths: list[int], seed: int = 0, n: int = 3, size: int = 8) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, widths[0], generator=gen),
            torch.randint(0, widths[-1], (size,), generator=gen),
        )
        for _ in range(n)
    ]


def weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1}


def initialized(model, method, data=None, seed=0) -> SparsityEngine:
    engine = SparsityEngine(model, weights(model), method, seed=seed)
    engine.setup(10, 5)
    if data is None:
        engine.initialize()
    else:
        engine.initialize(batches=lambda: iter(data), loss_fn=F.cross_entropy)
    return engine


def kept_target(sparsity: float, params: dict[str, torch.Tensor]) -> int:
    total = sum(p.numel() for p in params.values())
    return total - round(sparsity * total)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


# --------------------------------------------------------------------------------------
# registration and options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"), [("grasp", GraSP), ("synflow", SynFlow)])
def test_registered_with_a_fixed_schedule_only(name, cls):
    assert METHODS[name] is cls
    method = build_method(name, 0.9, distribution=dist("global"), schedule=FIXED)
    assert isinstance(method, cls) and method.name == name
    assert not any(method.is_update_step(t) for t in range(10))
    with pytest.raises(ConfigError) as err:
        build_method(name, 0.9, distribution=dist("global"), schedule={"kind": "prune_grow"})
    assert name in one_line(err)


@pytest.mark.parametrize(
    ("name", "options", "key"),
    [
        ("grasp", {"batches": 0}, "pruning.batches"),
        ("grasp", {"batches": -2}, "pruning.batches"),
        ("grasp", {"batches": 1.5}, "pruning.batches"),
        ("grasp", {"batches": "two"}, "pruning.batches"),
        ("grasp", {"temperature": 0}, "pruning.temperature"),
        ("grasp", {"temperature": -200}, "pruning.temperature"),
        ("grasp", {"temperature": float("inf")}, "pruning.temperature"),
        ("synflow", {"rounds": 0}, "pruning.rounds"),
        ("synflow", {"rounds": 2.5}, "pruning.rounds"),
        ("synflow", {"rounds": None}, "pruning.rounds"),
        ("synflow", {"dtype": "float16"}, "pruning.dtype"),
        ("grasp", {"bogus": 1}, "pruning=grasp"),
        ("synflow", {"batches": 1}, "pruning=synflow"),
    ],
)
def test_bad_options_are_one_line_config_errors(name, options, key):
    with pytest.raises(ConfigError) as err:
        build_method(name, 0.9, distribution=dist("global"), schedule=FIXED, **options)
    assert key in one_line(err)


def test_options_pass_through_to_the_base_class():
    method = build_method("grasp", 0.8, schedule=FIXED, batches=2, update_step="skip")
    assert method.update_step == "skip" and method.batches == 2
    assert method.describe() == {"batches": 2, "temperature": 200.0}
    method = build_method("synflow", 0.8, schedule=FIXED, rounds=3, update_step="skip")
    assert method.update_step == "skip" and method.describe() == {"rounds": 3, "dtype": "float64"}


# --------------------------------------------------------------------------------------
# GraSP
# --------------------------------------------------------------------------------------


def _summed_loss_grad(model, params, data, temperature) -> dict[str, torch.Tensor]:
    names, tensors = list(params), list(params.values())
    total = sum(F.cross_entropy(model(x) / temperature, y) for x, y in data)
    return dict(zip(names, torch.autograd.grad(total, tensors), strict=True))


@pytest.mark.parametrize(("n_batches", "temperature"), [(1, 200.0), (2, 1.0)])
def test_grasp_scores_are_theta_times_a_finite_difference_hessian_gradient(n_batches, temperature):
    """keep score = θ ⊙ Hg with Hg ≈ (g(θ + εg) − g(θ − εg)) / 2ε, all in float64; the mask
    keeps exactly the top keep scores, i.e. removes the largest -θ ⊙ Hg (the paper's score)."""
    widths, sparsity = [7, 9, 6, 4], 0.7
    model = mlp(widths, seed=5, act=nn.Tanh).double()
    data = [(x.double(), y) for x, y in batches_for(widths, seed=5)]
    params = weights(model)
    theta = {n: p.detach().clone() for n, p in params.items()}

    g = _summed_loss_grad(model, params, data[:n_batches], temperature)
    eps = 1e-4 / float(torch.sqrt(sum((v**2).sum() for v in g.values())))
    shifted = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[n] + sign * eps * g[n])
        shifted.append(_summed_loss_grad(model, params, data[:n_batches], temperature))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(theta[n])
    hg = {n: (shifted[0][n] - shifted[1][n]) / (2 * eps) for n in params}
    expected = {n: theta[n] * hg[n] for n in params}

    method = build_method(
        "grasp",
        sparsity,
        distribution=dist("global"),
        schedule=FIXED,
        batches=n_batches,
        temperature=temperature,
    )
    ctx = Context(0, 0, batches=lambda: iter(data), loss_fn=F.cross_entropy, model=model)
    scores = method.scores(params, ctx)
    scale = max(float(s.abs().max()) for s in expected.values())
    assert scale > 0
    for n in params:
        torch.testing.assert_close(scores[n], expected[n], rtol=0, atol=1e-6 * scale)

    sentinel = {n: torch.full_like(p, 7.0) for n, p in params.items()}
    for n, p in params.items():
        p.grad = sentinel[n].clone()
    model.eval()
    engine = initialized(model, method, data)
    keep = global_topk(expected, kept_target(sparsity, params))
    paper = {n: -s for n, s in expected.items()}  # S(-θ) = -θ ⊙ Hg; GraSP removes its top
    kept_paper = torch.cat([paper[n][keep[n]] for n in params])
    removed_paper = torch.cat([paper[n][~keep[n]] for n in params])
    assert removed_paper.min() >= kept_paper.max()
    for n, p in params.items():
        assert torch.equal(engine.masks[n], keep[n]), f"{n}: GraSP kept other weights"
        assert torch.equal(p.detach(), theta[n] * keep[n])
        assert torch.equal(p.grad, sentinel[n]), "GraSP clobbered the existing gradients"
    assert not model.training, "GraSP did not restore the model's mode"


def test_grasp_restores_batchnorm_statistics_and_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.eval()
    data = [(torch.randn(16, 6) * 3 + 1, torch.randint(0, 3, (16,))) for _ in range(3)]
    before = {n: b.clone() for n, b in model.named_buffers()}
    method = build_method("grasp", 0.5, distribution=dist("global"), schedule=FIXED, batches=3)
    engine = initialized(model, method, data)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), f"GraSP changed the buffer {name}"
    assert not model.training
    assert engine.masks.sparsity() == pytest.approx(0.5, abs=1e-9)


def test_grasp_without_data_fails_clearly():
    method = build_method("grasp", 0.5, distribution=dist("global"), schedule=FIXED)
    with pytest.raises(ValueError, match="GraSP"):
        initialized(mlp([6, 5, 3]), method)


# --------------------------------------------------------------------------------------
# SynFlow
# --------------------------------------------------------------------------------------


def test_synflow_scores_match_the_closed_form_of_a_linear_network():
    """For R = 1ᵀ|W3||W2||W1|1 the flow through W2[j, i] is |W2[j, i]| (1ᵀ|W3|)[j] (|W1|1)[i]."""
    model = mlp([5, 4, 3, 2], seed=1, bias=False, act=nn.Identity)
    params = weights(model)
    w1, w2, w3 = (p.detach().abs().double() for p in params.values())
    one_in, one_out = torch.ones(5, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    a1, a2 = w1 @ one_in, w2 @ (w1 @ one_in)  # forward flows
    b2, b1 = one_out @ w3, (one_out @ w3) @ w2  # backward flows
    expected = {
        "0.weight": w1 * b1[:, None] * one_in[None, :],
        "2.weight": w2 * b2[:, None] * a1[None, :],
        "4.weight": w3 * one_out[:, None] * a2[None, :],
    }
    method = build_method("synflow", 0.5, distribution=dist("global"), schedule=FIXED)
    ctx = Context(0, 0, batches=lambda: iter(batches_for([5, 2])), model=model)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    flow = method.synaptic_flow(params, masks, ctx, (5,))
    for n in params:
        torch.testing.assert_close(flow[n], expected[n])
        # Every layer carries the same total flow (the conservation law, no biases).
        assert float(flow[n].sum()) == pytest.approx(float(expected["0.weight"].sum()))


def test_synflow_leaves_the_model_as_it_was():
    """Signs, biases, buffers, .grad and the training mode survive; BatchNorm runs in eval
    mode (a one-sample batch would fail in training mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 3)
    )
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    data = [(torch.randn(4, 2, 10), torch.randint(0, 3, (4,)))]
    method = build_method("synflow", 0.6, distribution=dist("global"), schedule=FIXED, rounds=5)
    engine = initialized(model, method, data)
    masks = {f"{n}": engine.masks[n] for n in weights(model)}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        want = before[name] * masks[name] if name in masks else before[name]
        assert torch.equal(tensor.detach(), want), f"SynFlow changed {name}"
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 3.0)), "SynFlow touched .grad"
    assert model.training
    assert engine.masks.sparsity() == pytest.approx(0.6, abs=1e-3)


def test_synflow_does_not_depend_on_the_data():
    widths = [10, 16, 12, 4]
    masks = []
    for data in (
        batches_for(widths, seed=0, size=8),
        [(x * 100 + 3, y) for x, y in batches_for(widths, seed=9, size=2)],
        [(torch.zeros(1, widths[0]), torch.zeros(1, dtype=torch.long))],
    ):
        method = build_method("synflow", 0.9, distribution=dist("global"), schedule=FIXED)
        masks.append(initialized(mlp(widths, seed=2), method, data).masks)
    for other in masks[1:]:
        for n in masks[0]:
            assert torch.equal(masks[0][n], other[n])


@pytest.mark.parametrize("rounds", [1, 7, 100])
@pytest.mark.parametrize("sparsity", [0.9, 0.993])
def test_synflow_keeps_exactly_the_target_count(sparsity, rounds):
    widths = [20, 30, 30, 10]
    model = mlp(widths, seed=3)
    method = build_method(
        "synflow", sparsity, distribution=dist("global"), schedule=FIXED, rounds=rounds
    )
    engine = initialized(model, method, batches_for(widths))
    params = weights(model)
    kept = sum(int(m.sum()) for m in engine.masks.values())
    assert kept == kept_target(sparsity, params)
    assert sum(int((p != 0).sum()) for p in params.values()) <= kept


def test_synflow_keeps_a_per_layer_distribution_exact():
    widths = [20, 30, 30, 10]
    model = mlp(widths, seed=3)
    method = build_method("synflow", 0.9, distribution=dist("erk"), schedule=FIXED, rounds=10)
    engine = initialized(model, method, batches_for(widths))
    counts = method.keep_counts(0.9)
    assert {n: int(m.sum()) for n, m in engine.masks.items()} == counts


def _has_path(masks) -> bool:
    """Whether some input reaches some output through kept weights (Linear chain)."""
    reach = None
    for mask in masks.values():
        step = mask.double()
        reach = step if reach is None else step @ reach
    return bool((reach > 0).any())


def test_synflow_avoids_the_layer_collapse_that_snip_suffers():
    """A deep narrow MLP (8 bias-free Linear layers of width 32) at 99.5% sparsity keeps 46
    of 9,248 weights. On this seed SNIP's single global threshold empties the first layer
    (no input reaches the output); SynFlow keeps every layer and a path through them."""
    widths, sparsity = [32] * 8 + [10], 0.995
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))]
    kept = {}
    for name in ("snip", "synflow"):
        method = build_method(name, sparsity, distribution=dist("global"), schedule=FIXED)
        kept[name] = initialized(mlp(widths, seed=0, bias=False), method, data).masks
    snip_counts = [int(m.sum()) for m in kept["snip"].values()]
    synflow_counts = [int(m.sum()) for m in kept["synflow"].values()]
    assert sum(snip_counts) == sum(synflow_counts) == kept_target(sparsity, kept["snip"])
    assert min(snip_counts) == 0 and not _has_path(kept["snip"]), snip_counts
    assert min(synflow_counts) > 0 and _has_path(kept["synflow"]), synflow_counts


def test_bias_flow_breaks_conservation_and_zeroing_it_restores_it():
    """With biases, the reference's linearised network (|bias| kept) lets the first layers
    of a deep MLP collapse at 99.5%; bias_flow=false keeps every layer and a path."""
    widths, sparsity = [32] * 8 + [10], 0.995
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))]
    kept = {}
    for bias_flow in (True, False):
        method = build_method(
            "synflow", sparsity, distribution=dist("global"), schedule=FIXED, bias_flow=bias_flow
        )
        masks = initialized(mlp(widths, seed=0), method, data).masks
        kept[bias_flow] = [int(m.sum()) for m in masks.values()]
        if not bias_flow:
            assert _has_path(masks)
    assert min(kept[True]) == 0, kept[True]
    assert min(kept[False]) > 0, kept[False]


def test_synflow_without_data_fails_clearly():
    method = build_method("synflow", 0.5, distribution=dist("global"), schedule=FIXED)
    with pytest.raises(ValueError, match="SynFlow"):
        initialized(mlp([6, 5, 3]), method)


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["grasp", "synflow"])
def test_end_to_end_run_reaches_the_target(compose_cfg, method):
    from prunelab.train import train

    start = time.monotonic()
    record = train(compose_cfg(f"pruning={method}", "sparsity=0.9"))
    assert record["status"] == "completed"
    sp = record["sparsity"]
    assert abs(sp["global"] - 0.9) <= 1e-3, sp
    assert sp["weights_zero_global"] >= sp["global"] - 1e-9
    assert record["sparsity_curve"][-1]["sparsity/global"] == pytest.approx(sp["global"])
    assert time.monotonic() - start < 60
