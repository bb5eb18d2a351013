"""Routings for op tests."""
import torch


def routed(T: int, K: int, E: int, experts=None, dtype=torch.int32) -> torch.Tensor:
    """ids_TK: K distinct experts per token, as gating chooses them, drawn from `experts`
    (default all E)."""
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    return pool[torch.rand(T, len(pool)).argsort(dim=1)[:, :K]].to(dtype)
