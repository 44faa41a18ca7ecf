"""int8 post-training quantization and QAT keep pruned weights exactly zero (prunelab.quantize)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from prunelab.cost.export import masked_state_dict  # noqa: E402
from prunelab.errors import ConfigError  # noqa: E402
from prunelab.models import MLP  # noqa: E402
from prunelab.quantize import (  # noqa: E402
    fake_quant_weight,
    finalize_qat,
    int8_weights,
    load_int8,
    prepare_qat,
    qat_finetune,
    quantize_int8,
)

SHAPE = (1, 4, 5)


def _masks(model: nn.Module, density: float = 0.4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random masks on every 2+-dimensional weight; the second output channel of each one
    pruned whole (per-channel scale of an all-zero channel)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            mask = torch.rand(p.shape, generator=generator) < density
            mask[1] = False
            masks[name] = mask
    return masks


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(SHAPE, 4, hidden=(16, 8)).eval()


def _batches(n: int = 3, size: int = 16, shape=SHAPE, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, *shape, generator=generator), torch.randint(0, 4, (size,)))
        for _ in range(n)
    ]


def _assert_masked_zero(path, masks, names=None) -> None:
    weights = int8_weights(path)
    for name, mask in masks.items():
        weight = weights[(names or {}).get(name, name)]
        assert weight.q.dtype == np.int8
        assert np.all(weight.zero_point == 0)
        assert np.all(np.isfinite(weight.scale)) and np.all(weight.scale > 0)
        pruned = ~mask.numpy()
        assert not weight.q[pruned].any()
        real = weight.dequantize()
        assert np.all(real[pruned] == 0.0)  # exactly zero, not approximately
        assert not real[1].any()  # the channel pruned whole
        assert real[mask.numpy()].any()  # and the kept weights are not all gone


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_ptq_pruned_weights_are_exactly_zero(tmp_path, fmt):
    model = _mlp()
    masks = _masks(model)
    q = quantize_int8(
        model, masks, _batches(), SHAPE, tmp_path / "m.onnx", num_batches=2, quant_format=fmt
    )
    _assert_masked_zero(q.path, masks)
    report = q.report
    assert report.fp32 == {} and set(report.quantized) == set(masks)
    assert report.masks_checked == {n: int((~m).sum()) for n, m in masks.items()}
    assert report.calibration_batches == 2 and report.calibration_samples == 32
    assert report.size_bytes == q.path.stat().st_size > 0
    assert "all 3 weighted layers quantized" in report.note
    # The float model is untouched (not masked in place).
    assert any(bool(p[~masks[n]].any()) for n, p in model.named_parameters() if n in masks)


def test_ptq_conv_with_batchnorm_folded(tmp_path):
    """The export folds BatchNorm into the convolution and renames its weight: the mask is
    still found (by its zeros) and its positions are 0 in the int8 weight."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 3, 4),
    ).eval()
    with torch.no_grad():
        model[1].weight.uniform_(-2, 2)  # negative BN scales flip signs when folded
        model[1].running_var.uniform_(0.5, 2.0)
    masks = _masks(model)
    q = quantize_int8(model, masks, _batches(), SHAPE, tmp_path / "c.onnx")
    assert set(q.report.quantized) == {"0.weight", "4.weight"}
    assert q.report.masks_checked["0.weight"] == int((~masks["0.weight"]).sum())
    weights = int8_weights(q.path)
    conv = next(w for name, w in weights.items() if name != "4.weight")
    assert not conv.dequantize()[~masks["0.weight"].numpy()].any()
    _assert_masked_zero(q.path, {"4.weight": masks["4.weight"]})


def test_int8_reload_gives_same_predictions(tmp_path):
    model = _mlp()
    masks = _masks(model)
    q = quantize_int8(model, masks, _batches(), SHAPE, tmp_path / "m.onnx")
    x = _batches(1, 64, seed=7)[0][0]
    out = q(x)
    again = load_int8(tmp_path / "m.onnx", threads=1)
    assert torch.equal(again(x), out)
    assert torch.equal(again(x).argmax(1), out.argmax(1))
    assert again.report is not None and again.report.as_dict()["note"] == q.report.note
    assert again.report.masks_checked == q.report.masks_checked
    # int8 stays close to the fp32 masked model.
    model.load_state_dict(masked_state_dict(model, masks))
    reference = model(x).detach()
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


def _qat_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = _mlp(3)
    return model, _masks(model, seed=3)


def test_qat_keeps_masks_after_every_step(tmp_path):
    model, masks = _qat_model()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    seen = []

    def check(net: nn.Module, step: int) -> None:
        params = dict(net.named_parameters())
        seen.append(all(not params[n].detach()[~m].any() for n, m in masks.items()))

    # SGD with momentum and weight decay would revive pruned weights without re-masking.
    result = qat_finetune(
        model,
        masks,
        _batches(4),
        epochs=2,
        optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
        on_step=check,
    )
    assert result.steps == 8 and seen == [True] * 8 and len(result.epoch_losses) == 2
    assert set(result.activation_ranges) == {"layers.0", "layers.1", "head"}
    assert type(model.layers[0]) is nn.Linear and not model.training
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())
    q = quantize_int8(model, masks, _batches(), SHAPE, tmp_path / "qat.onnx")
    _assert_masked_zero(q.path, masks)
    # The deployed int8 weights are the fake-quantized weights QAT trained with.
    weights = int8_weights(q.path)
    for name, p in model.named_parameters():
        if name in masks:
            fake = fake_quant_weight(p.detach(), masks[name]).numpy()
            np.testing.assert_allclose(weights[name].dequantize(), fake, rtol=1e-6, atol=0)


def test_prepare_qat_in_place_and_finalize():
    model, masks = _qat_model()
    params = dict(model.named_parameters())
    x = _batches(1)[0][0]
    skipped = prepare_qat(model, masks)
    assert skipped == {}
    assert dict(model.named_parameters()) == params  # same objects, same names
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
    model.train()
    out = model(x)
    out.sum().backward()
    for name, mask in masks.items():
        assert not params[name].grad[~mask].any()  # no gradient into pruned weights
        assert not params[name].detach()[~mask].any()  # prepare_qat zeroed them
    model.eval()
    plain = finalize_qat(model)
    assert plain is model
    assert not any(hasattr(model.head, b) for b in ("qat_mask", "act_range", "act_seen"))
    assert type(model.head) is nn.Linear and model(x).shape == (16, 4)
    assert (out.detach() - model(x)).abs().max() < 0.5  # fake quantization is a small change


def test_fake_quant_weight_all_zero_channel():
    weight = torch.randn(3, 6, requires_grad=True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0] = False
    out = fake_quant_weight(weight, mask)
    assert torch.all(out[0] == 0) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.all(weight.grad[0] == 0) and torch.all(weight.grad[1:] == 1)


class _Bilinear(nn.Module):
    """A weight used through ``torch.einsum``: onnxruntime has no int8 Einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,oi->bo", x, self.weight)


def test_unquantizable_layer_is_reported(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 8), nn.ReLU(), _Bilinear()).eval()
    masks = _masks(model)
    q = quantize_int8(model, masks, _batches(), SHAPE, tmp_path / "e.onnx")
    assert set(q.report.quantized) == {"1.weight"}
    assert "Einsum" in q.report.fp32["3.weight"]
    assert "left in fp32: 3.weight" in q.report.note and "\n" not in q.report.note
    assert q.report.masks_checked["3.weight"] == -1  # zeros kept as fp32 0.0
    assert q(_batches(1)[0][0]).shape == (16, 4)
    with pytest.raises(ConfigError) as err:
        quantize_int8(model, masks, _batches(), SHAPE, tmp_path / "s.onnx", strict=True)
    assert "3.weight" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "s.onnx").exists()
    kept = quantize_int8(model, masks, _batches(), SHAPE, tmp_path / "k.onnx", keep_fp32=["1"])
    assert kept.report.fp32["1.weight"] == "kept in fp32 on request"


def _calls(tmp_path):
    model = _mlp()
    masks = _masks(model)
    out = tmp_path / "x.onnx"
    batches = _batches(1)
    return [
        lambda: quantize_int8(model, masks, batches, SHAPE, out, num_batches=0),
        lambda: quantize_int8(model, masks, [], SHAPE, out),
        lambda: quantize_int8(model, masks, [torch.randn(2, 3)], SHAPE, out),
        lambda: quantize_int8(model, masks, batches, SHAPE, out, quant_format="fp8"),
        lambda: quantize_int8(model, masks, batches, SHAPE, out, activation_type="int4"),
        lambda: quantize_int8(model, masks, batches, SHAPE, out, keep_fp32=["nope"]),
        lambda: quantize_int8(model, {"nope.weight": masks["head.weight"]}, batches, SHAPE, out),
        lambda: load_int8(tmp_path / "missing.onnx"),
        lambda: qat_finetune(model, masks, batches, epochs=0),
        lambda: qat_finetune(model, masks, batches, epochs=1, lr=0.0),
        lambda: qat_finetune(model, masks, [], epochs=1),
        lambda: prepare_qat(model, masks, momentum=0.0),
    ]


def test_errors_are_one_line(tmp_path):
    for call in _calls(tmp_path):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert message and "\n" not in message, message
