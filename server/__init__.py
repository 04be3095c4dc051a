"""Flower server side: `server_app` (discover, collect, merge, run), `strategy` (the rounds
both phases share: FedAvg with screening, DP and checkpoints), `phases` (the fine-tuning with
InMerge and pooled evaluation; the federated merge probe), `replies` (a round's replies read
into the core's types), `secagg` (one round through Flower's SecAgg+ under `secagg = true`:
the server gets only the weighted mean of the sites' updates), `messages` (send, receive,
name nodes) and `superlink_runtime` (`medmerge-superlink`: the SuperLink with a longer SQLite
lock wait)."""
