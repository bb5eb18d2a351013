"""unpermute (being built: for now the plain-PyTorch reference only)."""
from .. import reference


def unpermute(y_NH, plan, topk_weights_TK, *, backend=None):
    return reference.unpermute(y_NH, plan, topk_weights_TK)
