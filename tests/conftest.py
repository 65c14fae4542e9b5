"""Test-wide settings: one torch thread per process (2-core machines, Ray workers beside us)."""

import torch

torch.set_num_threads(1)
