import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proto_apps
from flwr.simulation import run_simulation

run_simulation(
    proto_apps.server,
    proto_apps.client,
    num_supernodes=3,
    backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 1, "num_gpus": 0},
    },
)
