"""topk_gating (being built: for now the plain-PyTorch reference only)."""
from .. import reference


def topk_gating(logits_TE, k, *, score="softmax", renormalize=True, expert_bias=None, num_groups=1, topk_groups=1, scaling=1.0, backend=None):
    return reference.topk_gating(logits_TE, k, score=score, renormalize=renormalize, expert_bias=expert_bias, num_groups=num_groups, topk_groups=topk_groups, scaling=scaling)
