"""lorabook.widgets: the numbers the controls show come from the oracles; static pages get no widget."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from ipywidgets.widgets import widget as widget_module  # noqa: E402

from lorabook import widgets  # noqa: E402
from lorabook.analysis import low_rank_approx, relative_error  # noqa: E402
from lorabook.quant.compare import quantization_error  # noqa: E402

PNG = b"\x89PNG"


def _delta(out_f=48, in_f=40, rank=6, seed=0):
    """A low-rank matrix plus a little noise: the shape of a fine-tuning update."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)
    return low + 0.05 * torch.randn(out_f, in_f, generator=g)


def test_rank_errors_are_those_of_the_truncated_svd():
    M = _delta()
    errors = widgets.rank_errors(M)
    assert errors.shape == (40,)
    for r in (1, 3, 6, 20, 40):
        assert errors[r - 1] == pytest.approx(relative_error(M, low_rank_approx(M, r)), abs=1e-5)
    assert errors[-1] < 1e-3 and (errors[:-1] >= errors[1:] - 1e-7).all()


def test_rank_slider_recomputes_when_moved():
    M = _delta()
    box = widgets.rank_slider(M, r=2, max_size=16)
    slider, caption, image = box.children
    assert isinstance(slider, ipywidgets.IntSlider) and slider.max == 40
    first = bytes(image.value)
    assert first.startswith(PNG) and box.state["r"] == 2
    slider.value = 6
    assert box.state["r"] == 6
    assert box.state["error"] == pytest.approx(relative_error(M, low_rank_approx(M, 6)), abs=1e-6)
    assert box.state["approx"].shape == (16, 16)
    assert "r = 6" in caption.value and f"{box.state['error']:.1%}" in caption.value
    assert bytes(image.value) != first


def test_rank_state_refuses_a_bad_rank():
    with pytest.raises(ValueError, match="min"):
        widgets.rank_state(_delta(), 41)
    with pytest.raises(ValueError, match="2-D"):
        widgets.rank_slider(torch.zeros(3))


def test_quantizer_table_matches_the_error_function_and_the_bit_count():
    W = torch.randn(128, 1024, generator=torch.Generator().manual_seed(0))
    rows = widgets.quantizer_table(W, blocksizes=(64, 256))
    assert len(rows) == 3 * 2 * 2
    nf4_64 = next(r for r in rows if (r["quant_type"], r["blocksize"], r["double_quant"])
                  == ("nf4", 64, False))
    assert nf4_64["mae"] == pytest.approx(quantization_error(W, "nf4", 64)["mae"], rel=1e-6)
    assert nf4_64["mae"] == pytest.approx(0.0728, abs=0.002)  # bitsandbytes' own test anchor
    assert nf4_64["bits_per_parameter"] == pytest.approx(4 + 32 / 64)  # codes + fp32 absmax
    assert nf4_64["bytes"] == pytest.approx(W.numel() * 4.5 / 8)
    dq = next(r for r in rows if (r["quant_type"], r["blocksize"], r["double_quant"])
              == ("nf4", 64, True))
    assert dq["bits_per_parameter"] == pytest.approx(4 + 8 / 64, abs=0.01)  # QLoRA's ~4.127
    fp4 = next(r for r in rows if (r["quant_type"], r["blocksize"], r["double_quant"])
               == ("fp4", 64, False))
    assert fp4["mae"] > nf4_64["mae"]  # NF4 beats FP4 on Gaussian weights
    with pytest.raises(ValueError, match="blocksize"):
        widgets.quantizer_table(W, blocksizes=(100,))


def test_quantizer_selector_follows_its_controls():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    box = widgets.quantizer_selector(W, blocksize=64, quant_type="nf4", double_quant=False)
    (bs, dq), qt, caption, image = box.children[0].children, *box.children[1:]
    assert bytes(image.value).startswith(PNG) and box.state["bits_per_parameter"] == pytest.approx(4.5)
    bs.value, qt.value = 256, "int4"
    assert (box.state["blocksize"], box.state["quant_type"]) == (256, "int4")
    assert box.state["mae"] == pytest.approx(quantization_error(W, "int4", 256)["mae"], rel=1e-6)
    assert "INT4, blocksize 256" in caption.value
    dq.value = True
    assert box.state["double_quant"] and "double quantization" in caption.value
    with pytest.raises(ValueError, match="blocksize"):
        widgets.quantizer_selector(W, blocksize=100)


def test_live_frontend_is_false_outside_a_kernel_and_can_be_forced(monkeypatch):
    monkeypatch.delenv(widgets.WIDGETS_ENV, raising=False)
    assert widgets.live_frontend() is False
    monkeypatch.setenv(widgets.WIDGETS_ENV, "on")
    assert widgets.live_frontend() is True
    monkeypatch.setenv(widgets.WIDGETS_ENV, "off")
    assert widgets.live_frontend() is False


def test_static_pages_get_a_figure_and_no_widget(monkeypatch):
    monkeypatch.setenv(widgets.WIDGETS_ENV, "off")
    before = len(widget_module._instances)
    view = widgets.rank_explorer(_delta(), ranks=(1, 6), max_size=16)
    assert isinstance(view, widgets.StaticView)
    assert len(widget_module._instances) == before  # no widget state for the notebook to save
    page = view._repr_html_()
    assert '<img src="data:image/png;base64,' in page and "Static view of the rank slider" in page
    assert view.png.startswith(PNG)
    static_q = widgets.quantizer_explorer(torch.randn(32, 64))
    assert isinstance(static_q, widgets.StaticView) and "quantizer selector" in static_q.note


def test_live_pages_get_the_widget(monkeypatch):
    monkeypatch.setenv(widgets.WIDGETS_ENV, "on")
    assert isinstance(widgets.rank_explorer(_delta(), max_size=16), ipywidgets.VBox)


def test_static_views_are_legible_in_the_book_column(monkeypatch):
    """The static figures follow lorabook.viz.export's rule: no text under 8 pt in the column."""
    from matplotlib.figure import Figure

    from lorabook.viz.plots import MIN_TEXT_PT

    monkeypatch.setenv(widgets.WIDGETS_ENV, "off")
    views = [widgets.rank_explorer(_delta(), ranks=(1, 2, 4, 6), max_size=16),
             widgets.quantizer_explorer(torch.randn(32, 64))]
    assert all(v.smallest_text_pt >= MIN_TEXT_PT for v in views)
    wide = Figure(figsize=(16, 4))
    wide.add_subplot().set_title("a title", fontsize=9)
    with pytest.raises(ValueError, match="smallest text shows at"):
        widgets.StaticView(wide, "too wide for the column")
