"""model/plan.py: WindowPlan's frame arithmetic: positions of the cache and the new tokens in
the frame, the parts, the next cache, the rotary starts of the windows."""

import pytest
import torch
from models import tiny

from blockrecurrent.model.plan import WindowPlan


@pytest.mark.parametrize("cache_len,n", [(0, 1), (0, 16), (0, 37), (5, 11), (15, 1), (16, 40),
                                         (20, 3), (31, 1), (31, 2)])
def test_window_plan_frame_arithmetic(cache_len, n):
    """The plan's positions agree with the frame layout: block 0 empty, then the cache from a
    block boundary, then the new tokens; parts cover the new tokens in order."""
    cfg = tiny().config
    W = cfg.block_width
    plan = WindowPlan(cfg, cache_len, n, torch.full((2,), cache_len))
    assert (plan.start, plan.end) == (W + cache_len, W + cache_len + n)
    assert plan.block_start(3) == 3 * W and plan.window_start(3) == 2 * W
    assert plan.rotary_position(W) == 0  # the cache starts at rotary position 0
    assert plan.index(plan.origin) == 0
    blocks = plan.query_blocks
    assert blocks == list(range(plan.start // W, (plan.end - 1) // W + 1))
    assert sum(part.num_queries for part in plan.parts) == n
    assert [plan.completes(blk) for blk in blocks] == [plan.block_start(blk + 1) <= plan.end
                                                       for blk in blocks]
    assert plan.first_window == plan.window_start(blocks[0]) == plan.origin
    # The next cache: the last complete block and the partial one after it (< 2W tokens).
    frame = torch.arange(plan.origin, plan.end).view(1, -1, 1, 1).float()
    nxt = plan.next_cache(frame)
    assert nxt.shape[1] < 2 * W and nxt[0, 0].item() == plan.block_start(plan.first_cached_block)
    assert nxt[0, -1].item() == plan.end - 1
    pair = plan.blocks_of(frame, blocks[0], blocks[0] + 1)
    lo = max(plan.origin, plan.block_start(blocks[0]))
    hi = min(plan.end, plan.block_start(blocks[0] + 1))  # the frame ends with the new tokens
    assert pair[0, 0].item() == lo and pair.shape[1] == hi - lo


def test_window_rotary_starts_sit_at_each_window_start():
    cfg = tiny(use_compressed_mem=True).config
    W = cfg.block_width
    plan = WindowPlan(cfg, 0, 4 * W, torch.zeros(1, dtype=torch.long))
    (part,) = plan.parts  # four full blocks, frame blocks 1 .. 4
    starts = plan.window_rotary_starts(part, torch.device("cpu"))
    # block 1's window starts in the empty block 0 (clamped to 0), block k's at (k - 2) W
    assert starts.tolist() == [0, 0, W, 2 * W]
