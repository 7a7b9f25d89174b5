"""bitsandbytes' CPU inference repacking (chapter 6): the defect pinned, and the way around it."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lorabook.bnb_cpu import is_repacked, keep_canonical, repacking_repro  # noqa: E402
from lorabook.qlora import bnb_quantize_model  # noqa: E402


def _repacks_here() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def test_repro_pins_the_defect_where_bitsandbytes_repacks():
    out = repacking_repro()
    shipped, control = out["as shipped"], out["keep_canonical"]
    # the control: fp32 compute on the stored codes, exact, with the input's gradient
    assert not control["repacked"] and control["quant_state dtype"] == "float32"
    assert control["max |output - x Q(W0)^T|"] == 0.0
    assert control["dequantize_4bit entries changed"] == 0.0
    assert control["input gradient"] == "correct" and not control["warnings in backward"]
    if _repacks_here():  # AVX512-BF16: bitsandbytes 0.50 repacks on the first eval forward
        assert shipped["repacked"], "bitsandbytes no longer repacks in place: revisit bnb_cpu"
        assert shipped["quant_state dtype"] == "bfloat16"
        assert shipped["max |output - x Q(W0)^T|"] > 1e-4  # bf16 rounding, not fp32's
        assert shipped["dequantize_4bit entries changed"] > 0.5  # the new layout read as the old
        assert shipped["input gradient"] == "missing"
        assert any("autograd kernel was not registered" in w for w in shipped["warnings in backward"])
    else:  # elsewhere the library as shipped is the control
        assert shipped == control


def test_keep_canonical_undoes_a_repacked_layer():
    torch.manual_seed(0)
    model = bnb_quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)),
                               cpu_repacking=True)
    layer = model[0]
    W = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (32, 64)
    codes = layer.weight.data.clone()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert is_repacked(layer) == _repacks_here()
    assert keep_canonical(model) == 1
    assert not is_repacked(layer) and layer.support_avx512bf16_for_cpu is False
    assert torch.equal(layer.weight.data, codes)
    # the absmax come back through bf16: close to, not always equal to, the stored ones
    W_back = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.allclose(W_back, W, rtol=1e-2, atol=0)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), x @ W_back.T)  # and it stays off on the next eval forward
    assert not is_repacked(layer)


def test_keep_canonical_needs_4bit_layers():
    with pytest.raises(ValueError, match="Linear4bit"):
        keep_canonical(torch.nn.Linear(4, 4))


def test_repro_checks_its_sizes():
    with pytest.raises(ValueError, match="blocksize"):
        repacking_repro(in_features=48)
