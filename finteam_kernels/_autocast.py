"""The dtype an op computes in under autocast.

autocast does not reach into custom ops, so callers of the experts cast their inputs as autocast
would cast a Linear's.
"""
import torch


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype the experts compute in: autocast's (which does not reach into custom ops, so the
    inputs are cast as autocast would cast a Linear's), else `default`."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else default


def cast_for_experts(x_TH: torch.Tensor, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor):
    """The experts' input and weights in their compute dtype (the weights' own outside autocast).
    Those already in it are passed as they are: `.to` returns them too, but at about 1 us a call,
    which at decode sizes is a few percent of the layer."""
    dtype = compute_dtype(x_TH.device, w_gate_up_E2IH.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (x_TH, w_gate_up_E2IH, w_down_EHI))
