"""Flower server side: `server_app` (discover, collect, merge, run), `strategy` (the rounds:
FedAvg with screening, InMerge, DP and checkpoints) and `messages` (send, receive, name nodes)."""
