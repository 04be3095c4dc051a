"""A drop-in replacement for flwr's SecAgg+ `pseudo_rand_gen` (flwr issue #7522): the full
32-byte seed keys AES-256-CTR (via `cryptography`, a flwr dependency) instead of a 32-bit
XOR-fold into numpy's Mersenne Twister. Both sides must use the same function."""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def safe_pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list):
    if num_range & (num_range - 1) or num_range > 2**32:
        raise ValueError("num_range must be a power of 2, at most 2**32")
    key = hashlib.sha256(b"secaggplus-mask" + seed).digest()
    sizes = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    stream = np.frombuffer(enc.update(b"\0" * (4 * sum(sizes))), dtype="<u4")
    out, pos = [], 0
    for dims, n in zip(dimensions_list, sizes, strict=False):
        vals = (stream[pos : pos + n] & np.uint32(num_range - 1)).astype(np.int64)
        out.append(vals.reshape(dims) if len(dims) else np.array(vals[0], dtype=np.int64))
        pos += n
    return out


def install() -> None:
    """Patch the two modules that imported flwr's `pseudo_rand_gen` by name. (Not with
    `import flwr.client.mod.secure_aggregation.secaggplus_mod as m`: the package's
    `__init__` re-exports the *function* `secaggplus_mod`, which shadows the submodule.)"""
    import importlib

    client_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    server_wf = importlib.import_module(
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
    )

    client_mod.pseudo_rand_gen = safe_pseudo_rand_gen
    server_wf.pseudo_rand_gen = safe_pseudo_rand_gen
