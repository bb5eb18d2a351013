"""Run in a virtual environment where only `pip install --no-build-isolation .` was done (torch
first): the kernels work alone, with their compiled CPU backend, and the pipeline says what it
lacks instead of failing somewhere inside."""
import importlib.util

import torch

import finteam_kernels as fk
from finteam_kernels import FinTeamMoE, router_aux_loss
from finteam_kernels import _ext

extras = ["transformers", "datasets", "tokenizers", "yaml", "tqdm", "matplotlib", "sklearn", "pytest"]
present = [m for m in extras if importlib.util.find_spec(m) is not None]
assert not present, f"the kernels-only install pulled in {present}"
assert _ext.load("cpu").usable, _ext.load("cpu").problem

torch.manual_seed(0)
for backend in ("cpu", "reference"):
    layer = FinTeamMoE(64, 128, 4, 2, backend=backend)
    x = torch.randn(3, 7, 64, requires_grad=True)
    y = layer(x)
    (y.square().mean() + router_aux_loss(layer)).backward()
    assert torch.isfinite(x.grad).all() and layer.experts.gate_up_proj.grad is not None
routing = fk.topk_gating(torch.randn(5, 4), 2)
assert routing.ids_TK.shape == (5, 2)

try:
    import finteam  # noqa: F401
except ImportError as err:
    assert "finteam[pipeline]" in str(err), err
else:
    raise AssertionError("the pipeline imported without its extras")
print("kernels-only install: finteam_kernels runs its layer on the cpu and reference backends; "
      "the pipeline asks for its extras")
