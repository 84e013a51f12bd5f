"""Tree verification: each root-to-node branch equals a plain chain forward of that branch."""
from __future__ import annotations

import torch

from casspec.tree import DraftTree


def test_every_branch_equals_its_chain_forward(engine):
    r = engine.runner
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (14,), generator=g)  # committed: 13 cached + the root
    cache = r.new_cache(64)
    pos = torch.arange(13)
    r.forward(prefix[:13], pos, pos, cache)
    cache.length = 13
    tree = DraftTree(int(prefix[13]), base=13)
    for parent in [0, 0, 1, 1, 2, 3, 5, 5, 7]:  # branching, depth up to 5
        tree.add(parent, int(torch.randint(0, 256, (), generator=g)), "d", 0.5, 0.5)
    logits = r.forward_batch([tree.segment(cache)])
    for node in range(len(tree)):
        chain = torch.cat([prefix, torch.tensor(tree.path_tokens(node), dtype=torch.long)])
        p = torch.arange(len(chain))
        ref = r.forward(chain, p, p, r.new_cache(64))[-1]
        torch.testing.assert_close(logits[node], ref, rtol=0, atol=1e-4)
        assert int(logits[node].argmax()) == int(ref.argmax())
