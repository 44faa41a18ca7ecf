"""Han et al. 2015 iterative pruning: the q x std rule, the iterations, the retraining
learning rate and its round trip through a checkpoint, and bad options."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import build_model, make_batches, prunable

from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.methods.han import HanPruning, IterativeSchedule
from prunelab.sparsity.distributions import keep_counts
from prunelab.sparsity.engine import SparsityEngine
from prunelab.sparsity.patterns import threshold_mask

WIDTHS = [12, 16, 10, 4]
STEPS, PER_EPOCH = 40, 10
LR = 0.05
# Pruning at steps 10, 20, 30 (begin 0.25, end 0.75 of 40 steps).
ITERATIVE = {
    "kind": "iterative",
    "begin": 0.25,
    "end": 0.75,
    "begin_epoch": None,
    "end_epoch": None,
}
PRUNE_STEPS = (10, 20, 30)


def dist(name: str) -> dict:
    return {"name": name, "dense_first": False, "dense_last": False, "power_scale": 1.0}


def han(sparsity: float = 0.9, distribution: str = "global", **options) -> HanPruning:
    method = build_method(
        "han", sparsity, distribution=dist(distribution), schedule=dict(ITERATIVE), **options
    )
    assert isinstance(method, HanPruning)
    return method


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


class Run:
    """A tiny model trained by the module's loop through the engine."""

    def __init__(self, method: HanPruning, seed: int = 0, scheduler=None) -> None:
        self.model = build_model(WIDTHS, seed=seed)
        self.params = prunable(self.model)
        self.batches = make_batches(WIDTHS, seed=seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9)
        self.scheduler = scheduler(self.optimizer) if scheduler else None
        self.engine = SparsityEngine(self.model, self.params, method, seed=seed)
        self.engine.setup(total_steps=STEPS, steps_per_epoch=PER_EPOCH)
        self.engine.initialize()
        self.engine.attach(self.optimizer)
        self.step = 0

    def train(self, until: int, on_update=None) -> None:
        """Optimizer steps ``self.step .. until - 1``; ``on_update(step, weights, masks)``
        with the weights and masks just before each update."""
        for step in range(self.step, until):
            self.optimizer.zero_grad(set_to_none=True)
            x, y = self.batches[step % len(self.batches)]
            F.cross_entropy(self.model(x), y).backward()
            weights = {n: p.detach().clone() for n, p in self.params.items()}
            masks = {n: m.clone() for n, m in self.engine.masks.items()}
            if self.engine.before_optimizer_step(step, self.optimizer) and on_update:
                on_update(step, weights, masks)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            for name, p in self.params.items():
                assert bool((p[~self.engine.masks[name]] == 0).all()), f"{name} at {step}"
        self.step = until

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]


# --------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------


def test_schedule_spreads_the_iterations_and_grows_the_sparsity():
    method = han(0.9, iterations=3)
    method.setup({"a": (4, 4)}, STEPS, PER_EPOCH)
    assert method.schedule.steps == PRUNE_STEPS
    assert [t for t in range(STEPS) if method.is_update_step(t)] == list(PRUNE_STEPS)
    levels = [method.schedule.sparsity_at(t, 0.9) for t in (9, 10, 20, 30, 39)]
    assert levels[0] == 0.0 and levels[-1] == levels[-2] == 0.9
    assert levels[1] < levels[2] < levels[3]
    # Each iteration keeps the same fraction of the survivors: density 0.1^(i/3).
    assert levels[1] == pytest.approx(1 - 0.1 ** (1 / 3))
    assert IterativeSchedule.spread(5, 5, 1).steps == (5,)
    merged = IterativeSchedule.spread(3, 4, 3)  # too few steps: iterations merge
    assert merged.steps == (3, 3, 4) and merged.sparsity_at(4, 0.9) == 0.9
    assert merged.sparsity_at(3, 0.9) == pytest.approx(1 - 0.1 ** (2 / 3))


def test_epochs_place_the_pruning_steps():
    method = build_method(
        "han",
        0.8,
        distribution=dist("global"),
        schedule={**ITERATIVE, "begin_epoch": 1, "end_epoch": 3},
        iterations=2,
    )
    method.setup({"a": (4, 4)}, STEPS, PER_EPOCH)
    assert method.schedule.steps == (10, 30)


# --------------------------------------------------------------------------------------
# the q x std rule, exact counts, and what pruning keeps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["global", "uniform", "erk"])
def test_each_iteration_prunes_below_q_times_the_layer_std(distribution):
    method = han(0.9, distribution)
    run = Run(method)
    seen = []

    def check(step, weights, before):
        after = run.engine.masks
        qs = method.last_quality
        assert set(qs) == set(run.params)
        if distribution == "global":
            assert len(set(qs.values())) == 1, "one common q with distribution=global"
        for name in run.params:
            q = qs[name]
            assert 0 < q < math.inf
            rule = threshold_mask(weights[name], q, "std", before[name])
            assert torch.equal(after[name], rule), f"{name}: mask is not |w| >= q * std"
        seen.append(step)

    run.train(STEPS, check)
    assert seen == list(PRUNE_STEPS)


@pytest.mark.parametrize("distribution", ["global", "uniform"])
@pytest.mark.parametrize(("sparsity", "iterations"), [(0.9, 3), (0.5, 1), (0.95, 4)])
def test_final_sparsity_is_on_target(distribution, sparsity, iterations):
    method = han(sparsity, distribution, iterations=iterations)
    run = Run(method, seed=1)
    levels = []
    run.train(STEPS, lambda step, w, m: levels.append(run.engine.masks.sparsity()))
    assert len(levels) == iterations
    assert levels == sorted(levels) and len(set(levels)) == iterations  # grows every time
    masks = run.engine.masks
    total = masks.numel()
    assert total - sum(masks.nnz().values()) == round(sparsity * total)
    if distribution == "uniform":
        shapes = {n: tuple(p.shape) for n, p in run.params.items()}
        expected = keep_counts("uniform", shapes, sparsity)
        assert masks.nnz() == expected  # each layer within one weight of its share
    for name, p in run.params.items():
        assert int((p != 0).sum()) <= int(masks[name].sum())


def test_pruned_weights_never_return_and_survivors_are_not_reset():
    method = han(0.9)
    run = Run(method)

    def check(step, weights, before):
        after = run.engine.masks
        for name, p in run.params.items():
            assert not bool((after[name] & ~before[name]).any()), f"{name} revived at {step}"
            # Right after the update (before the optimizer step): survivors unchanged.
            assert torch.equal(p.detach(), weights[name] * after[name]), name
        momentum = run.optimizer.state[run.params["0.weight"]]["momentum_buffer"]
        assert bool((momentum[~after["0.weight"]] == 0).all())
        assert bool((momentum[after["0.weight"]] != 0).any()), "survivors lost their state"

    run.train(PRUNE_STEPS[1] + 1, check)
    middle = {n: m.clone() for n, m in run.engine.masks.items()}
    run.train(STEPS, check)
    for name, mask in run.engine.masks.items():
        assert not bool((mask & ~middle[name]).any()), f"{name} revived after the 2nd prune"


@pytest.mark.parametrize(
    ("distribution", "extra"),
    [("uniform", {}), ("global", {}), ("erk", {"dense_first": True, "budget": "pruned"})],
)
def test_at_target_only_after_the_last_iteration(distribution, extra):
    method = build_method(
        "han", 0.9, distribution={**dist(distribution), **extra}, schedule=dict(ITERATIVE)
    )
    run = Run(method)
    flags = []
    for until in (*PRUNE_STEPS, STEPS):
        flags.append(run.engine.at_target())
        run.train(until + 1 if until < STEPS else STEPS)
    flags.append(run.engine.at_target())
    # Before any pruning, after iterations 1 and 2: not final; after iteration 3 and at the end.
    assert flags == [False, False, False, True, True]


# --------------------------------------------------------------------------------------
# pruning.quality: the paper's rule alone
# --------------------------------------------------------------------------------------


def test_quality_prunes_by_the_std_rule_and_reports_no_target():
    method = han(0.9, "uniform", quality=0.7)
    assert method.threshold == 0.7 and method.threshold_mode == "std"  # record: target null
    run = Run(method)
    levels = []

    def check(step, weights, before):
        for name in run.params:
            rule = threshold_mask(weights[name], 0.7, "std", before[name])
            assert torch.equal(run.engine.masks[name], rule), name
        levels.append(run.engine.masks.sparsity())
        assert run.engine.at_target() == (step == PRUNE_STEPS[-1])

    run.train(STEPS, check)
    assert levels == sorted(levels) and levels[0] > 0 and len(set(levels)) == 3
    assert method.at_target(run.engine.masks)
    # A fresh method (a resumed run) knows the masks are final once it is past the last step.
    fresh = han(0.9, "uniform", quality=0.7)
    fresh.setup({n: tuple(p.shape) for n, p in run.params.items()}, STEPS, PER_EPOCH)
    assert not fresh.at_target(run.engine.masks)
    fresh.is_update_step(STEPS - 1)
    assert fresh.at_target(run.engine.masks)


# --------------------------------------------------------------------------------------
# retraining learning rate
# --------------------------------------------------------------------------------------


def test_lr_is_divided_by_ten_at_the_first_prune_and_stays_so():
    run = Run(han(0.9))
    lrs = {}
    for step in range(STEPS):
        run.train(step + 1)
        lrs[step] = run.lrs()[0]
    assert all(lrs[t] == LR for t in range(PRUNE_STEPS[0]))
    assert all(lrs[t] == pytest.approx(LR / 10, rel=1e-12) for t in range(PRUNE_STEPS[0], STEPS))


def test_lr_factor_one_leaves_the_lr_alone():
    run = Run(han(0.9, retrain_lr_factor=1))
    run.train(STEPS)
    assert run.lrs() == [LR]


def test_every_param_group_is_scaled():
    model = build_model(WIDTHS)
    params = prunable(model)
    others = [p for p in model.parameters() if all(p is not q for q in params.values())]
    optimizer = torch.optim.SGD(
        [{"params": list(params.values())}, {"params": others, "lr": 0.2}], lr=LR
    )
    engine = SparsityEngine(model, params, han(0.9), seed=0)
    engine.setup(STEPS, PER_EPOCH)
    engine.initialize()
    engine.before_optimizer_step(PRUNE_STEPS[0], optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([LR / 10, 0.02])


def test_missing_optimizer_is_a_clear_error():
    model = build_model(WIDTHS)
    engine = SparsityEngine(model, prunable(model), han(0.9), seed=0)
    engine.setup(STEPS, PER_EPOCH)
    engine.initialize()
    with pytest.raises(ValueError, match="retrain_lr_factor"):
        engine.before_optimizer_step(PRUNE_STEPS[0], None)


def _through_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("cut", [PRUNE_STEPS[0] + 3, PRUNE_STEPS[1] + 3])
def test_lr_survives_a_checkpoint_round_trip(cut):
    """Save optimizer and engine after the first prune, restore into fresh objects (as a
    resumed run does) and go on: the lr stays lr/10, never scaled a second time."""
    full = Run(han(0.9))
    full.train(STEPS)
    part = Run(han(0.9))
    part.train(cut)
    saved = _through_bytes(
        {
            "model": part.model.state_dict(),
            "optimizer": part.optimizer.state_dict(),
            "engine": part.engine.state_dict(),
        }
    )
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == pytest.approx([LR / 10])
    resumed = Run(han(0.9))
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.engine.load_state_dict(saved["engine"])
    resumed.step = cut
    assert resumed.lrs() == pytest.approx([LR / 10])
    resumed.train(STEPS)
    assert resumed.lrs() == pytest.approx([LR / 10], rel=1e-12)
    assert resumed.engine.masks.equal(full.engine.masks)
    for name, p in full.params.items():
        assert torch.allclose(p, resumed.params[name])


def _cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)


def _multistep(optimizer):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[15, 25], gamma=0.5)


@pytest.mark.parametrize("scheduler", [_cosine, _multistep])
def test_chainable_schedulers_keep_the_factor(scheduler):
    """Lightning steps the scheduler after the optimizer; cosine and multistep scale the
    current lr, so after the first prune the lr is a tenth of the unpruned schedule's, also
    after restoring optimizer and scheduler from a checkpoint mid-run."""
    reference = Run(han(0.9, retrain_lr_factor=1), scheduler=scheduler)
    run = Run(han(0.9), scheduler=scheduler)
    cut = PRUNE_STEPS[1] + 2
    for step in range(STEPS):
        if step == cut:  # checkpoint round trip of optimizer and scheduler
            saved = _through_bytes(
                {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}
            )
            optimizer = torch.optim.SGD(run.model.parameters(), lr=LR, momentum=0.9)
            fresh = scheduler(optimizer)  # built first, as Lightning's configure_optimizers
            optimizer.load_state_dict(saved["optimizer"])
            fresh.load_state_dict(saved["scheduler"])
            run.optimizer, run.scheduler = optimizer, fresh
            run.engine.attach(optimizer)
        reference.train(step + 1)
        run.train(step + 1)
        factor = 1.0 if step < PRUNE_STEPS[0] else 0.1
        assert run.lrs()[0] == pytest.approx(factor * reference.lrs()[0], rel=1e-9, abs=1e-15)


def test_lambda_lr_would_undo_the_factor_so_it_is_rejected():
    run = Run(
        han(0.9),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0),
    )
    run.train(PRUNE_STEPS[0] + 2)
    assert run.lrs() == [LR], "LambdaLR recomputes the lr from its base value"
    with pytest.raises(ConfigError) as err:
        han(0.9, lr_scheduler="torch.optim.lr_scheduler.LambdaLR")
    message = one_line(err)
    assert "LambdaLR" in message and "retrain_lr_factor" in message
    for ok in (
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "torch.optim.lr_scheduler.MultiStepLR",
    ):
        han(0.9, lr_scheduler=ok)
    han(0.9, lr_scheduler="torch.optim.lr_scheduler.OneCycleLR", retrain_lr_factor=1)


# --------------------------------------------------------------------------------------
# configuration errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"iterations": 0}, "pruning.iterations"),
        ({"iterations": 2.5}, "pruning.iterations"),
        ({"iterations": "three"}, "pruning.iterations"),
        ({"quality": -1.0}, "pruning.quality"),
        ({"quality": 0}, "pruning.quality"),
        ({"quality": "high"}, "pruning.quality"),
        ({"quality": True}, "pruning.quality"),
        ({"quality": math.inf}, "pruning.quality"),
        ({"retrain_lr_factor": 0}, "pruning.retrain_lr_factor"),
        ({"retrain_lr_factor": 10}, "pruning.retrain_lr_factor"),
        ({"retrain_lr_factor": "x"}, "pruning.retrain_lr_factor"),
        ({"threshold": 0.5}, "pruning.quality"),
        ({"threshold_mode": "std"}, "pruning.quality"),
        ({"lr_scheduler": "torch.optim.lr_scheduler.CyclicLR"}, "CyclicLR"),
        ({"update_step": "never"}, "pruning.update_step"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, needle):
    with pytest.raises(ConfigError) as err:
        han(0.9, **options)
    assert needle in one_line(err)


@pytest.mark.parametrize(
    ("schedule", "needle"),
    [
        ({"kind": "one_shot", "at": 0.5}, "pruning=han cannot use a 'one_shot'"),
        ({"kind": "polynomial"}, "pruning=han cannot use a 'polynomial'"),
        ({"kind": "prune_grow"}, "pruning=han cannot use a 'prune_grow'"),
        ({**ITERATIVE, "begin": 0.8, "end": 0.2}, "schedule.end"),
        ({**ITERATIVE, "begin_epoch": 50, "end_epoch": 10}, "schedule.end"),
        ({**ITERATIVE, "end": 1.5}, "outside [0, 1]"),
    ],
)
def test_bad_schedules_are_one_line_config_errors(schedule, needle):
    with pytest.raises(ConfigError) as err:
        build_method("han", 0.9, distribution=dist("global"), schedule=schedule)
    assert needle in one_line(err)


def test_n_m_is_rejected():
    with pytest.raises(ConfigError) as err:
        build_method(
            "han", 0.5, distribution={**dist("global"), "n_m": "2:4"}, schedule=dict(ITERATIVE)
        )
    assert "pruning=han" in one_line(err)
