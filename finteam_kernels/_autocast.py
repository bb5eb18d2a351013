"""The dtype an op computes in under autocast.

autocast does not reach into custom ops, so callers of the experts cast their inputs as autocast
would cast a Linear's.
"""
import torch


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype the experts compute in: autocast's (which does not reach into custom ops, so the
    inputs are cast as autocast would cast a Linear's), else `default`."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else default
