"""lorabook.quant.state: the memo of codebook lookup tables."""

import torch


def test_cached_table_is_reused_per_codebook_and_kind():
    from lorabook.quant.state import cached_table

    calls = []

    def build(value):
        def make():
            calls.append(value)
            return torch.full((4,), value)
        return make

    nf4 = torch.tensor([-1.0, 0.0, 1.0])
    first = cached_table("test-kind", nf4, build(1.0))
    assert cached_table("test-kind", nf4.clone(), build(2.0)) is first  # same values: no rebuild
    assert cached_table("test-other", nf4, build(3.0))[0] == 3.0  # another kind
    assert cached_table("test-kind", nf4 * 0.5, build(4.0))[0] == 4.0  # other values
    assert calls == [1.0, 3.0, 4.0]
