"""Structure rules (how the widths move toward the FLOPs budget during phase 1) and their schedules.

Plain PyTorch; imports only :mod:`gsm_lightning.core`."""
