"""L0 regularisation: hard-concrete gates, the expected-L0 penalty, the fold into the engine's
masks, the optimizer groups and the gates' state dict."""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import build_model, make_batches, prunable

from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.methods.l0 import L0Regularization
from prunelab.module import ClassificationModule
from prunelab.sparsity.engine import SparsityEngine

WIDTHS = [12, 16, 4]
FIXED = {"kind": "fixed"}


def _method(sparsity: float = 0.8, **options) -> L0Regularization:
    dist = {"name": options.pop("distribution", "global")}
    schedule = options.pop("schedule", FIXED)
    return build_method("l0", sparsity, distribution=dist, schedule=schedule, **options)


def _engine(model, total_steps: int = 40, sparsity: float = 0.8, **options) -> SparsityEngine:
    method = _method(sparsity, **options)
    params = prunable(model)
    method.attach(model, params)
    engine = SparsityEngine(model, params, method, seed=0)
    engine.setup(total_steps=total_steps, steps_per_epoch=10)
    engine.initialize()
    return engine


def _optimizer(engine: SparsityEngine, lr: float = 0.05) -> torch.optim.Optimizer:
    groups = [{"params": list(engine.model.parameters())}, *engine.method.parameter_groups()]
    optimizer = torch.optim.Adam(groups, lr=lr)
    engine.attach(optimizer)
    return optimizer


def _train(engine: SparsityEngine, optimizer, batches, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(engine.model(x), y)
        penalty = engine.penalty(step)
        (loss if penalty is None else loss + penalty).backward()
        engine.before_optimizer_step(step, optimizer)
        optimizer.step()


@torch.no_grad()
def _density(engine: SparsityEngine) -> float:
    gates = engine.method.gates
    return float(gates.expected_l0()) / gates.n_weights


def test_penalty_is_lambda_times_the_expected_density_of_the_gated_weights():
    model = build_model(WIDTHS, seed=0)
    engine = _engine(model, l0_lambda=0.3)
    gates = engine.method.gates
    shift = (2 / 3) * math.log(0.1 / 1.1)
    expected = sum(torch.sigmoid(la - shift).sum() for la in gates.log_alpha) / gates.n_weights
    assert torch.allclose(engine.penalty(0), 0.3 * expected)
    # log_alpha starts near log((1 - 0.5) / 0.5) = 0: P(z != 0) = sigmoid(-shift) ~ 0.83
    assert _density(engine) == pytest.approx(torch.sigmoid(torch.tensor(-shift)).item(), abs=0.01)
    assert _engine(build_model(WIDTHS), l0_lambda=0.0).penalty(0) is None


def test_expected_l0_decreases_under_the_penalty():
    densities = {}
    for lam in (0.0, 2.0):
        model = build_model(WIDTHS, seed=1)
        engine = _engine(model, total_steps=1000, l0_lambda=lam)
        start = _density(engine)
        _train(engine, _optimizer(engine), make_batches(WIDTHS, seed=1), range(40))
        densities[lam] = (start, _density(engine))
    (start, plain), (_, penalised) = densities[0.0], densities[2.0]
    assert penalised < start - 0.1, "the penalty should close gates"
    assert penalised < plain - 0.1


def test_gates_are_stochastic_in_training_and_deterministic_in_eval():
    model = build_model(WIDTHS, seed=2)
    engine = _engine(model)
    gates = engine.method.gates
    x = torch.randn(5, WIDTHS[0])
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    first = model(x)
    assert torch.equal(first, model(x))
    # The deterministic gate is min(1, max(0, sigmoid(log_alpha) * 1.2 - 0.1)).
    with torch.no_grad():
        gated = [
            w * (torch.sigmoid(la) * 1.2 - 0.1).clamp(0, 1)
            for w, la in zip(prunable(model).values(), gates.log_alpha, strict=True)
        ]
        h = F.relu(F.linear(x, gated[0], model[0].bias))
        assert torch.allclose(first, F.linear(h, gated[1], model[2].bias))
    # After the forward the layer's weight is its Parameter again.
    assert model[0].weight is prunable(model)["0.weight"]


def test_gates_get_gradients_and_the_optimizer_trains_them():
    model = build_model(WIDTHS, seed=3)
    engine = _engine(model)
    optimizer = _optimizer(engine)
    gates = list(engine.method.gates.parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in gates)
    assert engine.method.parameter_groups()[0]["weight_decay"] == 0.0
    before = [p.detach().clone() for p in gates]
    _train(engine, optimizer, make_batches(WIDTHS, seed=3), range(1))
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in gates)
    assert all(not torch.equal(a, p) for a, p in zip(before, gates, strict=True))


def _module(seed: int = 4, decay_norm_bias: bool = True, **options) -> ClassificationModule:
    model = build_model(WIDTHS, seed=seed)
    method = _method(**options)
    engine = SparsityEngine(model, prunable(model), method, seed=0)
    return ClassificationModule(
        model,
        WIDTHS[-1],
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        engine=engine,
        weight_decay_norm_bias=decay_norm_bias,
    )


@pytest.mark.parametrize("decay_norm_bias", [True, False])
def test_module_setup_attaches_the_gates_and_gives_them_an_optimizer_group(decay_norm_bias):
    module = _module(decay_norm_bias=decay_norm_bias)
    module.setup("fit")
    module.setup("test")  # idempotent
    gates = module.engine.method.gates
    assert module.pruning_state is gates
    groups = module.parameter_groups()
    assert groups[-1]["weight_decay"] == 0.0
    assert [id(p) for p in groups[-1]["params"]] == [id(p) for p in gates.parameters()]
    model_params = [p for g in groups[:-1] for p in g["params"]]
    assert len(model_params) == len(list(module.model.parameters()))
    assert any(k.startswith("pruning_state.log_alpha.") for k in module.state_dict())


def _through_bytes(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_gates_survive_a_state_dict_round_trip():
    module = _module(seed=5)
    module.setup("fit")
    with torch.no_grad():
        for la in module.pruning_state.log_alpha:
            la.uniform_(-3, 3)
    state = _through_bytes(module.state_dict())
    fresh = _module(seed=6)
    fresh.setup("fit")
    fresh.load_state_dict(state)
    for a, b in zip(module.pruning_state.log_alpha, fresh.pruning_state.log_alpha, strict=True):
        assert torch.equal(a, b)
    x = torch.randn(3, WIDTHS[0])
    module.eval(), fresh.eval()
    assert torch.equal(module(x), fresh(x))


def test_after_the_fold_the_state_dict_is_a_plain_models():
    module = _module(seed=7)
    module.setup("fit")
    engine = module.engine
    engine.setup(total_steps=1, steps_per_epoch=1)
    engine.initialize()
    assert engine.before_optimizer_step(0)  # step 0 is the last: fold
    state = _through_bytes(module.state_dict())
    assert not any(k.startswith("pruning_state") for k in state)
    plain = ClassificationModule(build_model(WIDTHS), WIDTHS[-1], optimizer=torch.optim.Adam)
    plain.load_state_dict(state)  # what eval.py does: no gates, strict
    # A module with fresh gates (a resumed run) takes it too and knows the gates are folded.
    fresh = _module(seed=8)
    fresh.setup("fit")
    fresh.load_state_dict(state)
    assert fresh.engine.method.folded
    x = torch.randn(3, WIDTHS[0])
    for m in (module, plain, fresh):
        m.eval()
    assert torch.equal(module(x), plain(x)) and torch.equal(module(x), fresh(x))


def test_the_fold_installs_the_deterministic_gates_as_the_final_mask():
    model = build_model(WIDTHS, seed=9)
    total = 12
    engine = _engine(model, total_steps=total, l0_lambda=1.0)
    method, gates = engine.method, engine.method.gates
    with torch.no_grad():  # close about half the gates for sure
        for la in gates.log_alpha:
            la.copy_(torch.where(torch.rand_like(la) < 0.5, -4.0, 2.0))
    optimizer = _optimizer(engine, lr=1e-3)
    batches = make_batches(WIDTHS, seed=9)
    _train(engine, optimizer, batches, range(total - 1))
    assert engine.masks.sparsity() == 0.0 and not method.folded
    assert not engine.at_target()
    x = torch.randn(6, WIDTHS[0])
    model.eval()
    with torch.no_grad():
        expected_out = model(x)
        expected = {
            n: (p * gates.deterministic(gates.index[n])).clone() for n, p in prunable(model).items()
        }
    model.train()
    _train(engine, optimizer, batches, range(total - 1, total))  # the fold step (skip)
    assert method.folded and engine.n_updates == 1
    for name, p in prunable(model).items():
        assert torch.equal(p.detach(), expected[name]), "the folding step's update is not taken"
        assert torch.equal(engine.masks[name], expected[name] != 0)
    model.eval()
    assert torch.allclose(model(x), expected_out, atol=1e-6)
    assert not model[0]._forward_pre_hooks, "no hooks left on the finished model"
    assert engine.penalty(total) is None
    report = method.report(engine.masks)
    assert report["realised"] == pytest.approx(engine.masks.sparsity())
    assert report["distance"] == pytest.approx(report["realised"] - 0.8)
    assert report["at_target"] is False and not engine.at_target()  # ~0.5 < 0.8


def _fold(model, sparsity: float, **options):
    engine = _engine(model, total_steps=1, sparsity=sparsity, **options)
    engine.before_optimizer_step(0)
    return engine


def test_sparse_enough_gates_are_at_target():
    model = build_model(WIDTHS, seed=10)
    method = _method(0.5)
    method.attach(model, prunable(model))
    with torch.no_grad():
        for la in method.gates.log_alpha:
            la.copy_(torch.where(torch.arange(la.numel()).view_as(la) % 4 == 0, 3.0, -5.0))
    engine = SparsityEngine(model, prunable(model), method)
    engine.setup(total_steps=1, steps_per_epoch=1)
    engine.initialize()
    engine.before_optimizer_step(0)
    assert engine.masks.sparsity() == pytest.approx(0.75, abs=0.01)
    assert engine.at_target()
    assert method.fold_summary["distance"] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("conv", [False, True])
def test_neuron_granularity_prunes_whole_rows(conv):
    model = build_model(WIDTHS, conv=conv, seed=11)
    engine = _engine(model, total_steps=1, granularity="neuron")
    gates = engine.method.gates
    for name, p in prunable(model).items():
        la = gates.log_alpha[gates.index[name]]
        assert la.shape == (p.shape[0],) + (1,) * (p.dim() - 1)
        with torch.no_grad():
            la.copy_(torch.where(torch.arange(p.shape[0]) % 3 == 0, -5.0, 3.0).view_as(la))
    engine.before_optimizer_step(0)
    for name, mask in engine.masks.items():
        rows = mask.flatten(1)
        assert bool((rows.all(dim=1) | ~rows.any(dim=1)).all()), f"{name}: partial rows"
        assert not rows[::3].any() and rows[1::3].all()


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_prune_to_target_meets_the_target(granularity):
    model = build_model(WIDTHS, seed=12)
    engine = _fold(model, 0.8, granularity=granularity, prune_to_target=True)
    sparsity = engine.masks.sparsity()
    if granularity == "weight":
        assert sparsity == pytest.approx(0.8, abs=1e-9 + len(WIDTHS) / engine.masks.numel())
    else:  # whole rows, rounded down: at least the target, less than a row per layer over
        assert (
            0.8
            <= sparsity
            < 0.8 + sum(m[0].numel() for m in engine.masks.values()) / engine.masks.numel()
        )
        for mask in engine.masks.values():
            rows = mask.flatten(1)
            assert bool((rows.all(dim=1) | ~rows.any(dim=1)).all())
    assert engine.at_target()
    for name, p in prunable(model).items():
        assert (p.detach()[~engine.masks[name]] == 0).all()


def test_kept_dense_layers_get_no_gates():
    model = build_model([12, 16, 8, 4], seed=13)
    method = build_method(
        "l0", 0.5, distribution={"name": "global", "dense_last": True}, schedule=FIXED
    )
    gates = method.attach(model, prunable(model))
    assert gates.names == ["0.weight", "2.weight"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("l0_lambda", -1.0),
        ("l0_lambda", "big"),
        ("l0_lambda", True),
        ("granularity", "channel"),
        ("droprate_init", 0.0),
        ("droprate_init", 1.0),
        ("beta", 0.0),
        ("gamma", 0.1),
        ("zeta", 1.0),
        ("zeta", float("nan")),
        ("prune_to_target", "yes"),
        ("update_step", "sometimes"),
    ],
)
def test_bad_options_are_one_line_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"pruning.{key}") as err:
        _method(**{key: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["polynomial", "prune_grow"])
def test_other_schedules_are_config_errors(kind):
    with pytest.raises(ConfigError, match="fixed or one_shot") as err:
        build_method("l0", 0.9, schedule={"kind": kind})
    assert "\n" not in str(err.value)


def test_one_shot_schedule_folds_early_and_fine_tunes_with_the_mask_fixed():
    model = build_model(WIDTHS, seed=14)
    schedule = {"kind": "one_shot", "at": 0.5, "at_epoch": None}
    engine = _engine(model, total_steps=20, schedule=schedule, l0_lambda=1.0)
    optimizer = _optimizer(engine)
    batches = make_batches(WIDTHS, seed=14)
    _train(engine, optimizer, batches, range(10))
    assert not engine.method.folded
    _train(engine, optimizer, batches, range(10, 11))
    assert engine.method.folded and engine.penalty(11) is None
    masks = {n: m.clone() for n, m in engine.masks.items()}
    before = {n: p.detach().clone() for n, p in prunable(model).items()}
    _train(engine, optimizer, batches, range(11, 20))
    assert engine.n_updates == 1
    for name, p in prunable(model).items():
        assert torch.equal(engine.masks[name], masks[name])
        assert (p.detach()[~masks[name]] == 0).all()
        assert not torch.equal(p.detach(), before[name]), "the survivors are fine-tuned"


def test_training_without_attached_gates_fails_clearly():
    model = build_model(WIDTHS)
    engine = SparsityEngine(model, prunable(model), _method())
    with pytest.raises(RuntimeError, match="attach"):
        engine.penalty(0)
