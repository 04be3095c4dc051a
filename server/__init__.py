"""Flower server side: `server_app` (discover, collect, merge, run), `strategy` (the rounds:
FedAvg with screening, InMerge, DP and checkpoints), `secagg` (one round through Flower's
SecAgg+ under `secagg = true`: the server gets only the weighted mean of the sites' updates)
`messages` (send, receive, name nodes) and `superlink_runtime` (`medmerge-superlink`: the
SuperLink with a longer SQLite lock wait)."""
