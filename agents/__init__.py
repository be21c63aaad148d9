"""Scheduling policies over the simulator's protocols: routing, batching, pools; evaluation."""
