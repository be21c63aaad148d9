"""Shared test setup: wandb never reaches the network, plots never open a window."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
