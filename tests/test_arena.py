"""The arena: several tensors in one allocation, cut back by a layout."""

import pytest
import torch

from transformers_headq import arena


@pytest.mark.core
def test_views_hold_what_was_written_and_do_not_overlap():
    like = [
        torch.empty(2, 3, 8, 5, dtype=torch.uint8),
        torch.empty(2, 3, 1, 7, dtype=torch.float16),
        torch.empty(3, 4, 2, dtype=torch.float32),
        torch.empty(1, 1, 3, 3, dtype=torch.bfloat16),
    ]
    data, layout, views = arena.allocate(like, torch.device("cpu"))
    assert [(v.shape, v.dtype) for v in views] == [(t.shape, t.dtype) for t in like]
    assert all(v.is_contiguous() and v.data_ptr() % arena.ALIGN_BYTES == 0 for v in views)
    filled = [torch.randn(t.shape).mul(50).to(t.dtype) for t in like]
    for view, values in zip(views, filled, strict=True):
        view.copy_(values)
    for view, values in zip(arena.carve(data, layout), filled, strict=True):  # cut again from the text
        assert torch.equal(view, values)
    assert data.numel() == sum(arena.padded_nbytes(t) for t in like)


def test_an_unsupported_dtype_is_refused():
    with pytest.raises(TypeError, match="arena holds"):
        arena.plan([torch.empty(3, dtype=torch.int64)])
