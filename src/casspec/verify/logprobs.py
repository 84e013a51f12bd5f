"""Log-probabilities of committed tokens, read from the verify forward's own target logits (free)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenLogprob:
    """log p(token | prefix) under the target model (raw logits, before any sampling transform)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # the `top_logprobs` most likely tokens at this position, best first
    text: str = ""  # the token's text (set by Generation, which has the tokenizer)
    top_text: list[str] = field(default_factory=list)  # text of each `top` token

    def to_dict(self) -> dict:
        return {"token": self.token, "text": self.text, "logprob": self.logprob,
                "top": [[i, t, lp] for (i, lp), t in zip(self.top, self.top_text or [""] * len(self.top))]}


def path_logprobs(logits: torch.Tensor, path: list[int], tokens: list[int], top: int) -> list[TokenLogprob]:
    """Logprobs of `tokens` committed along tree `path`: token j was predicted at node path[j].

    logits: [N, V] target logits of every tree node; len(tokens) == len(path) (accepted drafts + bonus).
    """
    lp = torch.log_softmax(logits[path].float(), dim=-1)  # [len(path), V]
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()  # [len(path)]
    if top > 0:
        best = torch.topk(lp, top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, tp) for t, c, tp in zip(tokens, chosen, tops)]
