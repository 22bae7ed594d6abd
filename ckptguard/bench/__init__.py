"""The benchmark harness behind ``ckptguard bench``.

It measures ckptguard beside its peers (torch.save, PyTorch DCP, safetensors, h5py) and beside the
machine's own limits (sequential write with fsync, cold read, host and device copies), on the same
state and in the same directory, and reports medians of alternating trials as JSON, Markdown and
PNG. It uses ckptguard's public API only.
"""

from ckptguard.units import parse_size

# The workload names, here rather than in workloads.py (which needs torch) so that the command's
# help can list them without importing torch.
WORKLOADS = ("model", "finetune", "small", "weights")

__all__ = ["WORKLOADS", "parse_size"]
