"""Dynamic Network Surgery: splicing back, training the pruned weights in the engine's
shadow, resume, the final sparsity, the surgery probability and the option errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import build_model, make_batches, prunable
from torch import nn

from prunelab.errors import ConfigError
from prunelab.methods import METHODS, build_method
from prunelab.methods.dns import DynamicNetworkSurgery
from prunelab.sparsity.engine import Context, SparsityEngine
from prunelab.sparsity.masks import Masks

WIDTHS = [10, 12, 4]


def ramp(begin: float = 0.0, end: float = 0.5, frequency: int = 1, power: float = 3) -> dict:
    return {
        "kind": "polynomial",
        "begin": begin,
        "end": end,
        "begin_epoch": None,
        "end_epoch": None,
        "frequency": frequency,
        "power": power,
    }


def dns(sparsity: float = 0.8, dist: str = "uniform", schedule: dict | None = None, **options):
    method = build_method(
        "dns",
        sparsity,
        distribution={"name": dist, "dense_first": False, "dense_last": False},
        schedule=schedule or ramp(),
        **options,
    )
    assert isinstance(method, DynamicNetworkSurgery)
    return method


def engine_for(model: nn.Module, method, total: int, seed: int = 0) -> SparsityEngine:
    engine = SparsityEngine(model, prunable(model), method, seed=seed)
    engine.setup(total_steps=total, steps_per_epoch=max(1, total // 4))
    engine.initialize()
    return engine


def step(engine: SparsityEngine, model, optimizer, batch, t: int) -> bool:
    optimizer.zero_grad(set_to_none=True)
    x, y = batch
    F.cross_entropy(model(x), y).backward()
    changed = engine.before_optimizer_step(t, optimizer)
    optimizer.step()
    return changed


def through_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_registered_with_the_engine_flags():
    assert METHODS["dns"] is DynamicNetworkSurgery
    method = dns()
    assert method.keeps_pruned_values and not method.mask_gradients
    assert method.reset_state == "none"


# --------------------------------------------------------------------------------------
# surgery: prune below (1 - m)θ, splice back above (1 + m)θ, keep the state in between
# --------------------------------------------------------------------------------------


def test_surgery_splices_back_a_weight_above_the_upper_threshold():
    """|w| = 0.1 .. 2.0, the ten smallest pruned. Weight 2 (pruned) grows to 2.5, above
    every active weight: surgery splices it back and prunes the smallest active weight
    (1.1). Weight 4 (pruned) grows to 1.25, above the active 1.2 but inside the band around
    θ: it stays pruned and 1.2 stays active; without the band (margin=0) it would swap."""
    signs = torch.tensor([1.0, -1.0]).repeat(10)
    w = (torch.arange(1, 21, dtype=torch.float) / 10 * signs).view(4, 5)
    mask = (w.abs() > 1.0).clone()
    w.view(-1)[2] = 2.5
    w.view(-1)[4] = -1.25
    method = dns(0.5, schedule=ramp(0.0, 0.0))
    method.setup({"l0": (4, 5)}, 10, 10)
    new = method.update(0, {"l0": w}, Masks({"l0": mask}), Context(seed=0, step=0))["l0"]
    expected = mask.clone()
    expected.view(-1)[2] = True  # spliced back
    expected.view(-1)[10] = False  # |w| = 1.1, the smallest active weight
    assert torch.equal(new, expected)
    assert not bool(new.view(-1)[4]), "a pruned weight inside the band was spliced back"
    theta, c = method.thresholds["l0"]
    magnitude = w.abs()
    mean, std = float(magnitude.mean()), float(magnitude.std(correction=0))
    assert theta == pytest.approx(mean + c * std, rel=1e-5)
    # The rule, stated with θ: pruned weights were at most 1.1θ, active ones are above 0.9θ.
    assert float(magnitude[~new & ~mask].max()) <= 1.1 * theta + 1e-6
    assert float(magnitude[new & mask].min()) > 0.9 * theta
    assert float(magnitude.view(-1)[2]) > 1.1 * theta
    # Without the band the larger pruned weight takes the active one's place instead.
    plain = dns(0.5, schedule=ramp(0.0, 0.0), margin=0.0)
    plain.setup({"l0": (4, 5)}, 10, 10)
    swapped = plain.update(0, {"l0": w}, Masks({"l0": mask}), Context(seed=0, step=0))["l0"]
    assert bool(swapped.view(-1)[4]) and not bool(swapped.view(-1)[11])
    assert bool(swapped.view(-1)[2]) and not bool(swapped.view(-1)[10])


def test_the_engine_splices_back_a_pruned_weight_that_grew_in_the_shadow():
    """Through the engine: a pruned weight whose full-precision value is raised above the
    upper threshold is active after the next surgery, with that value in the parameter."""
    model = build_model(WIDTHS, seed=1)
    batches = make_batches(WIDTHS, seed=1)
    method = dns(0.8, schedule=ramp(0.0, 0.9))
    engine = engine_for(model, method, total=20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine.attach(optimizer)
    for t in range(12):
        step(engine, model, optimizer, batches[t % len(batches)], t)
    name = "0.weight"
    pruned = (~engine.masks[name]).flatten().nonzero().flatten()
    assert pruned.numel() > 0
    target = int(pruned[0])
    engine.shadow[name].view(-1)[target] = 10.0 * float(engine.shadow[name].abs().max())
    assert step(engine, model, optimizer, batches[0], 12)  # an update step
    assert bool(engine.masks[name].view(-1)[target]), "the grown weight was not spliced back"
    value = float(engine.shadow[name].view(-1)[target])
    assert float(prunable(model)[name].detach().view(-1)[target]) == value
    assert value > 1.1 * method.thresholds[name][0]


# --------------------------------------------------------------------------------------
# the shadow: W ⊙ T in forward, every W trained
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_pruned_weights_are_zero_in_forward_but_keep_training(optimizer_name):
    model = build_model(WIDTHS, seed=2)
    batches = make_batches(WIDTHS, seed=2)
    params = prunable(model)
    method = dns(0.8, schedule=ramp(0.0, 0.5))
    engine = engine_for(model, method, total=20)
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if optimizer_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    engine.attach(optimizer)
    seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(
        lambda *_: seen.append({n: p.detach().clone() for n, p in params.items()})
    )
    moved = 0
    for t in range(20):
        masks = {n: m.clone() for n, m in engine.masks.items()}
        pruned_before = {n: engine.shadow[n][~masks[n]].clone() for n in params}
        active_before = {n: engine.shadow[n][masks[n]].clone() for n in params}
        step(engine, model, optimizer, batches[t % len(batches)], t)
        for n in params:
            # The forward saw W ⊙ T: zeros where pruned, the full values where active.
            assert bool((seen[-1][n][~masks[n]] == 0).all()), f"step {t}: {n} pruned in forward"
            assert torch.equal(seen[-1][n][masks[n]], active_before[n])
            # The parameter after the step: the shadow under the new mask.
            p, s, m = params[n].detach(), engine.shadow[n], engine.masks[n]
            assert bool((p[~m] == 0).all()) and torch.equal(p[m], s[m])
            moved += int((engine.shadow[n][~masks[n]] != pruned_before[n]).sum())
        state = optimizer.state[params["0.weight"]]
        buffer = state.get("momentum_buffer", state.get("exp_avg"))
        off = ~engine.masks["0.weight"]
        if bool(off.any()):
            assert bool((buffer[off] != 0).any()), "the optimizer state of pruned weights is 0"
    assert engine.masks.sparsity() == pytest.approx(0.8, abs=0.02)
    assert moved > 0, "the full-precision values of pruned weights never changed"


def test_a_step_that_does_not_run_leaves_the_forward_masked():
    """No optimizer step after before_optimizer_step (an AMP overflow step skips it and its
    post-hook): the next forward still sees W ⊙ T."""
    model = build_model(WIDTHS, seed=3)
    batches = make_batches(WIDTHS, seed=3)
    params = prunable(model)
    engine = engine_for(model, dns(0.8, schedule=ramp(0.0, 0.0)), total=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine.attach(optimizer)
    step(engine, model, optimizer, batches[0], 0)  # prunes to 80%
    x, y = batches[1]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    engine.before_optimizer_step(1, optimizer)
    assert any(bool((p.detach()[~engine.masks[n]] != 0).any()) for n, p in params.items())
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(params["0.weight"].detach().clone()))
    model(x)
    assert bool((seen[0][~engine.masks["0.weight"]] == 0).all())


# --------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [6, 13])  # between two solves, after the masks froze
def test_shadow_round_trips_and_resume_is_exact(cut):
    """The shadow and the thresholds in force come back from the checkpoint: the resumed
    run makes the same surgery and ends with the same weights, bit for bit."""
    total = 18
    batches = make_batches(WIDTHS, seed=4)
    schedule = ramp(0.0, 0.6, frequency=4)
    model_a = build_model(WIDTHS, seed=4)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    engine_a = engine_for(model_a, dns(0.8, "global", schedule, gamma=0.05), total, seed=7)
    engine_a.attach(opt_a)
    for t in range(cut):
        step(engine_a, model_a, opt_a, batches[t % len(batches)], t)
    checkpoint = through_bytes(
        {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "engine": engine_a.state_dict()}
    )
    saved = checkpoint["engine"]["shadow"]
    assert any(bool((saved[n][~engine_a.masks[n].cpu()] != 0).any()) for n in saved)

    model_b = build_model(WIDTHS, seed=99)
    method_b = dns(0.8, "global", schedule, gamma=0.05)
    engine_b = SparsityEngine(model_b, prunable(model_b), method_b)
    engine_b.load_state_dict(checkpoint["engine"])  # on_load_checkpoint: before the weights
    model_b.load_state_dict(checkpoint["model"])
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    opt_b.load_state_dict(checkpoint["opt"])
    engine_b.setup(total_steps=total, steps_per_epoch=max(1, total // 4))
    engine_b.attach(opt_b)
    for n, p in prunable(model_b).items():
        assert engine_b.shadow[n].device == p.device and engine_b.shadow[n].dtype == p.dtype
        assert torch.equal(engine_b.shadow[n], engine_a.shadow[n])
    assert method_b.thresholds == engine_a.method.thresholds
    for t in range(cut, total):
        changed_a = step(engine_a, model_a, opt_a, batches[t % len(batches)], t)
        changed_b = step(engine_b, model_b, opt_b, batches[t % len(batches)], t)
        assert changed_a == changed_b
        assert engine_b.masks.equal(engine_a.masks), f"masks diverged at step {t}"
    assert engine_b.history == engine_a.history
    for n in engine_a.shadow:
        assert torch.equal(engine_a.shadow[n], engine_b.shadow[n])
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb), f"{name} differs after resume"


def test_a_checkpoint_without_a_shadow_starts_it_from_the_weights():
    model = build_model(WIDTHS, seed=5)
    batches = make_batches(WIDTHS, seed=5)
    engine = engine_for(model, dns(0.8, schedule=ramp(0.0, 0.0)), total=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine.attach(optimizer)
    step(engine, model, optimizer, batches[0], 0)
    state = engine.state_dict()
    state["shadow"] = None
    engine.load_state_dict(state)
    assert engine.shadow is None
    step(engine, model, optimizer, batches[1], 1)
    for n, p in prunable(model).items():
        assert torch.equal(engine.shadow[n][engine.masks[n]], p.detach()[engine.masks[n]])


# --------------------------------------------------------------------------------------
# schedule, probability, target
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dist", "sparsity"), [("global", 0.9), ("uniform", 0.8), ("erk", 0.85)])
def test_ends_at_the_target_and_freezes_the_masks(dist, sparsity):
    total = 30
    model = build_model([12, 16, 10, 4], conv=True, seed=6)
    batches = make_batches([12, 16, 10, 4], conv=True, seed=6)
    method = dns(sparsity, dist, ramp(0.1, 0.6, frequency=4), gamma=0.02)
    engine = engine_for(model, method, total)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine.attach(optimizer)
    end = method.schedule.end_step
    frozen = None
    for t in range(total):
        assert not engine.at_target() or t > end
        step(engine, model, optimizer, batches[t % len(batches)], t)
        if t == end:
            frozen = {n: m.clone() for n, m in engine.masks.items()}
        if frozen is not None:
            assert all(torch.equal(frozen[n], engine.masks[n]) for n in frozen)
    numel = engine.masks.numel()
    assert sum(engine.masks.nnz().values()) == numel - round(sparsity * numel)
    if dist != "global":  # each layer exactly at its share
        assert engine.masks.nnz() == method.keep_counts(sparsity)
    assert engine.at_target()
    assert engine.sparsity_report()["global"] == pytest.approx(sparsity, abs=1 / numel)
    for n, p in engine.params.items():
        assert bool((p.detach()[~engine.masks[n]] == 0).all())


def test_the_sparsity_follows_the_ramp():
    """gamma=0: every layer operates at every step. At the schedule's points the thresholds
    are solved and every layer holds exactly its count; in between the two-threshold rule
    with those thresholds lets the sparsity float, close to the ramp."""
    model = build_model(WIDTHS, seed=8)
    batches = make_batches(WIDTHS, seed=8)
    method = dns(0.9, "uniform", ramp(0.0, 0.75, frequency=4), gamma=0.0)
    engine = engine_for(model, method, total=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine.attach(optimizer)
    end = method.schedule.end_step
    for t in range(32):
        step(engine, model, optimizer, batches[t % len(batches)], t)
        if method.schedule.is_update_step(t):
            assert engine.masks.nnz() == method.keep_counts(method.target_at(t)), t
        elif t < end:
            assert engine.masks.sparsity() == pytest.approx(method.target_at(t), abs=0.05)
    assert engine.n_updates == end + 1
    assert engine.masks.nnz() == method.keep_counts(0.9)


def test_between_the_points_surgery_is_the_two_threshold_rule():
    """A solve at step 10 (a point of the schedule) fixes θ; at step 11 the weights moved:
    an active weight at or below 0.9·θ is pruned, a pruned one above 1.1·θ spliced back,
    every other keeps its state; the counts need not hold."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(20, 10, generator=gen)
    method = dns(0.7, schedule=ramp(0.0, 1.0, frequency=10), gamma=0.0)
    method.setup({"l0": (20, 10)}, 100, 10)
    masks = Masks.dense_like({"l0": w})
    masks = method.update(10, {"l0": w}, masks, Context(seed=0, step=10))
    assert masks.nnz()["l0"] == method.keep_counts(method.target_at(10))["l0"] < 200
    theta, c = method.thresholds["l0"]
    w2 = w + 0.3 * torch.randn(20, 10, generator=gen)
    new = method.update(11, {"l0": w2}, masks, Context(seed=0, step=11))["l0"]
    mask, magnitude = masks["l0"], w2.abs()
    assert method.thresholds["l0"] == (theta, c)  # unchanged between points
    expected = torch.where(mask, magnitude > 0.9 * theta, magnitude > 1.1 * theta)
    assert torch.equal(new, expected)
    assert bool((new & ~mask).any()) and bool((mask & ~new).any())
    band = (magnitude > 0.9 * theta) & (magnitude <= 1.1 * theta)
    assert bool(band.any()) and torch.equal(new[band], mask[band])


def test_surgery_probability_decays_and_is_the_same_on_every_rank():
    method = dns(0.8, schedule=ramp(0.0, 1.0), gamma=0.01, power=1.5)
    method.setup({"l0": (4, 4)}, 10_001, 100)
    assert method.probability(0) == 1.0
    assert method.probability(300) == pytest.approx((1 + 3.0) ** -1.5)
    assert method.probability(method.schedule.end_step) == 1.0  # the final surgery
    early = [method.undergoes_surgery(t, 0, Context(seed=3, step=t)) for t in range(1, 400)]
    late = [method.undergoes_surgery(t, 0, Context(seed=3, step=t)) for t in range(5000, 5400)]
    assert sum(early) > 3 * sum(late) > 0
    assert sum(late) / 400 == pytest.approx((1 + 0.01 * 5200) ** -1.5, abs=0.02)
    again = [method.undergoes_surgery(t, 0, Context(seed=3, step=t)) for t in range(1, 400)]
    assert again == early  # a function of (seed, step, layer): every rank draws alike
    other = [method.undergoes_surgery(t, 1, Context(seed=3, step=t)) for t in range(1, 400)]
    assert other != early


def test_two_engines_with_the_same_seed_make_the_same_masks():
    digests = []
    for _ in range(2):
        model = build_model(WIDTHS, seed=9)
        batches = make_batches(WIDTHS, seed=9)
        engine = engine_for(model, dns(0.8, schedule=ramp(0.0, 0.8), gamma=0.2), 20, seed=5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        engine.attach(optimizer)
        trace = []
        for t in range(20):
            step(engine, model, optimizer, batches[t % len(batches)], t)
            trace.append(engine.mask_digest())
        digests.append(trace)
    assert digests[0] == digests[1]


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gamma", -1.0),
        ("gamma", "fast"),
        ("gamma", True),
        ("gamma", math.inf),
        ("power", -0.5),
        ("power", None),
        ("margin", 1.0),
        ("margin", -0.1),
        ("update_step", "skip"),
        ("adam_bias_correction", "per_weight"),
    ],
)
def test_bad_options_are_one_line_config_errors(key, value):
    with pytest.raises(ConfigError) as err:
        dns(**{key: value})
    message = str(err.value)
    assert "\n" not in message and f"pruning.{key}" in message


@pytest.mark.parametrize("kind", ["fixed", "one_shot", "prune_grow"])
def test_schedule_kinds_other_than_polynomial_are_rejected(kind):
    with pytest.raises(ConfigError) as err:
        dns(schedule={"kind": kind})
    assert "\n" not in str(err.value) and kind in str(err.value)
