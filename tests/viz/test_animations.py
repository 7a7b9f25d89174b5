"""lorabook.viz.animations: the frames are the maths (checked exactly); the files get written."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lorabook.analysis import low_rank_approx, relative_error  # noqa: E402
from lorabook.viz import animations  # noqa: E402
from lorabook.viz.animations import (  # noqa: E402
    decomposition_animation,
    decomposition_frames,
    save_animation,
    svd_approximation_animation,
    svd_frames,
)

pytestmark = pytest.mark.filterwarnings("ignore:Animation was deleted:UserWarning")


def _factors(out_f=40, in_f=30, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g), torch.randn(r, in_f, generator=g),
            torch.randn(out_f, r, generator=g))


def test_decomposition_frames_end_at_w0_plus_scaled_ba():
    W0, A, B = _factors()
    frames = decomposition_frames(W0, A, B, scaling=0.5, blend_frames=5)
    assert len(frames) == 1 + 4 + 5  # W0 alone, one frame per rank-1 term, the blend
    assert [f["stage"] for f in frames] == ["W0"] + ["build"] * 4 + ["add"] * 5
    assert [f["rank"] for f in frames[1:5]] == [1, 2, 3, 4]
    W0, A, B = W0.double(), A.double(), B.double()
    np.testing.assert_allclose(frames[-1]["W"], (W0 + 0.5 * B @ A).numpy(), atol=1e-12, rtol=0)
    np.testing.assert_allclose(frames[-1]["delta"], (0.5 * B @ A).numpy(), atol=1e-12, rtol=0)
    np.testing.assert_array_equal(frames[0]["W"], W0.double().numpy())
    assert np.isnan(frames[0]["B"]).all() and np.isnan(frames[2]["A"][2:]).all()
    assert frames[-1]["t"] == 1.0


def test_decomposition_crops_to_the_block_of_the_full_product():
    W0, A, B = _factors(out_f=100, in_f=90, r=20)
    frames = decomposition_frames(W0, A, B, scaling=2.0, max_size=16, blend_frames=3,
                                  max_build=5)
    assert frames[-1]["W"].shape == (16, 16) and frames[-1]["B"].shape == (16, 20)
    assert len(frames) == 1 + 5 + 3 and frames[5]["rank"] == 20
    full = (W0.double() + 2.0 * B.double() @ A.double()).numpy()
    np.testing.assert_allclose(frames[-1]["W"], full[:16, :16], atol=1e-12, rtol=0)
    assert "top-left 16 × 16 block of 100 × 90" in frames[-1]["block"]


def test_decomposition_rejects_mismatched_shapes():
    W0, A, B = _factors()
    with pytest.raises(ValueError, match=r"A \(r, in\)"):
        decomposition_frames(W0, A.T, B)
    with pytest.raises(ValueError, match="blend_frames"):
        decomposition_frames(W0, A, B, blend_frames=0)


def test_decomposition_animation_saves_a_gif(tmp_path):
    W0, A, B = _factors()
    anim = decomposition_animation(W0, A, B, scaling=2.0, blend_frames=3)
    frames = anim._lorabook_frames
    assert len(frames) == 1 + 4 + 3
    assert anim._fig._suptitle.get_text() == frames[0]["caption"]
    path = save_animation(anim, tmp_path / "lora.gif", fps=4, dpi=25)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(frames)
    assert anim._fig._suptitle.get_text() == frames[-1]["caption"]


def test_svd_frames_default_ranks_end_at_the_full_matrix():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(40, 24, generator=g)
    frames = svd_frames(M)
    assert [f["rank"] for f in frames] == [1, 2, 4, 8, 16, 24]
    np.testing.assert_allclose(frames[-1]["approx"], M.double().numpy(), atol=1e-10, rtol=0)
    assert frames[-1]["error"] < 1e-12 and frames[-1]["energy"] == pytest.approx(1.0)
    errors = [f["error"] for f in frames]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    for f in frames:  # the same numbers as lorabook.analysis
        want = relative_error(M.double(), low_rank_approx(M.double(), f["rank"]))
        assert f["error"] == pytest.approx(want, abs=1e-10)


def test_svd_frames_crop_and_reject_bad_ranks():
    M = torch.randn(80, 70)
    frames = svd_frames(M, ranks=[1, 3, 70], max_size=20)
    assert len(frames) == 3 and frames[0]["approx"].shape == (20, 20)
    np.testing.assert_allclose(frames[-1]["approx"], M[:20, :20].double().numpy(), atol=1e-9)
    for bad in ([0, 2], [2, 1], [1, 71]):
        with pytest.raises(ValueError, match="rank"):
            svd_frames(M, ranks=bad)


def test_svd_animation_saves_a_gif(tmp_path):
    M = torch.randn(30, 20, generator=torch.Generator().manual_seed(2))
    anim = svd_approximation_animation(M, ranks=(1, 4, 20))
    assert len(anim._lorabook_frames) == 3
    path = save_animation(anim, tmp_path / "svd.gif", fps=2, dpi=25)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
    assert anim._fig._suptitle.get_text().startswith("rank 20: relative error 0.0%")


def test_save_animation_formats(tmp_path, monkeypatch):
    anim = svd_approximation_animation(torch.randn(6, 5), ranks=(1, 5))
    with pytest.raises(ValueError, match=".gif or .mp4"):
        save_animation(anim, tmp_path / "a.avi")
    monkeypatch.setattr(animations.animation.writers, "is_available", lambda name: False)
    with pytest.raises(RuntimeError, match="ffmpeg"):
        save_animation(anim, tmp_path / "a.mp4")
    assert save_animation(anim, tmp_path / "a.GIF", dpi=20).stat().st_size > 0


def test_to_jshtml_embeds_every_frame_at_the_given_dpi():
    import base64
    import io
    import re

    anim = svd_approximation_animation(torch.randn(12, 10), ranks=(1, 2, 10))
    html = animations.to_jshtml(anim, dpi=20)
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=\\\n]+)", html)  # JS lines end in \
    assert len(pngs) == 3
    first = re.sub(r"[\\\n]", "", pngs[0])
    with Image.open(io.BytesIO(base64.b64decode(first))) as frame:
        assert frame.size == (17 * 20, round(6.5 * 20))  # figsize (17, 6.5) inches at 20 dpi
    with pytest.raises(ValueError, match="dpi"):
        animations.to_jshtml(anim, dpi=0)


def test_to_jshtml_loads_nothing_from_the_network():
    """matplotlib's player links Font Awesome from a CDN; ours has Unicode icons instead."""
    W = torch.randn(8, 8)
    anim = svd_approximation_animation(W, ranks=[1, 2])
    raw = anim.to_jshtml()
    assert "font-awesome" in raw and raw.count('<i class="fa fa-') == 9  # what is replaced
    page = animations.to_jshtml(anim, dpi=20)
    assert "font-awesome" not in page and "https://" not in page and "fa fa-" not in page
    assert page.count('class="anim-icon"') == 9 and "▶︎" in page and "◀︎" in page
    with pytest.raises(TypeError, match="to_jshtml"):
        animations.offline_jshtml(b"bytes")
