"""The federated merge probe (`probe-mode = "federated"`), without Flower.

Every site runs the coordinator's probe step (`probe.train_probe`) on its own target data from
the server's probe state, and returns only what the probe learns (`MergedModel.probe_state`:
the coefficients, the norm layers and the head; never the merged convs, which the sources and
the coefficients determine). `ProbePlan` is what the server needs for that: the common start
(drawn from the run's seed, so the sites need not be sent it in advance), the keys that travel
and that DP clips, and the bake of the aggregate into a plain model. The sources travel to each
site once per run; `sources_digest` names them so that a site can cache them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from medmerge_core.federation.run import state_digest
from medmerge_core.federation.transport import ModelInfo, model_reference
from medmerge_core.merge import MergedModel, combine_source_major
from medmerge_core.models import StateDict, fit_backbone
from medmerge_core.probe import seeded_probe
from medmerge_core.settings import ProbeSettings


def sources_digest(sources: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """A content hash of the source backbones as sent (site cache key, integrity check)."""
    digest = hashlib.sha256("/".join(state_digest(s) for s in sources).encode())
    return digest.hexdigest()[:16]


def fitted_sources(
    sources: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], info: ModelInfo
) -> list[StateDict]:
    """The sources as the target model takes them (the stem fitted to its input channels)."""
    return [
        fit_backbone(dict(s), info.arch, info.in_channels, f"source '{n}'")
        for s, n in zip(sources, names, strict=True)
    ]


@dataclass(frozen=True)
class ProbePlan:
    """The federated probe as the server holds it; `sources` as collected, `seed` the run's."""

    sources: tuple[StateDict, ...]
    names: tuple[str, ...]
    info: ModelInfo
    settings: ProbeSettings
    seed: int

    def probe(self) -> MergedModel:
        """A fresh probe at the common start (the coordinator's, for the same seed)."""
        info = self.info
        fitted = fitted_sources(self.sources, self.names, info)
        return seeded_probe(
            info.arch,
            info.num_classes,
            info.in_channels,
            fitted,
            self.names,
            self.settings,
            self.seed,
        )

    @cached_property
    def _start(self) -> tuple[StateDict, list[str]]:
        probe = self.probe()
        return probe.probe_state(), probe.probe_parameter_keys()

    @property
    def initial(self) -> StateDict:
        """The probe state every site starts round 1 from (also the reference of its keys,
        shapes and dtypes)."""
        return dict(self._start[0])

    @property
    def parameter_keys(self) -> list[str]:
        """The keys training changes by gradient: what DP clips and noises."""
        return list(self._start[1])

    @property
    def norm_keys(self) -> list[str]:
        """The norm layers' keys (kept at each site under FedBN)."""
        return model_reference(self.info)[2]

    def bake(self, state: Mapping[str, torch.Tensor]) -> tuple[StateDict, dict[str, np.ndarray]]:
        """(the plain merged model's state on the CPU, its coefficients [d, ...] per merged key)
        for an aggregated probe state; keys it lacks (norm layers under FedBN, integer
        counters) keep their start values."""
        probe = self.probe()
        probe.load_probe_state({**self.initial, **state})
        baked = probe.bake()
        return {k: v.detach().cpu() for k, v in baked.state_dict().items()}, (
            probe.coefficient_arrays()
        )

    def check_baked(
        self,
        state: Mapping[str, torch.Tensor],
        coefficients: Mapping[str, np.ndarray],
        allow_fp16: bool = False,
    ) -> str | None:
        """Why a coordinator's merged model is not the bake of these sources by the coefficients
        it returned (a coefficient set for other keys than the probe merges, or a merged tensor
        that the sources and coefficients do not give), or None. The norm layers and the head
        were learned on the coordinator's data and cannot be re-derived here."""
        probe = self.probe()
        expected = probe.coefficient_map()
        if set(coefficients) != set(expected):
            key = sorted(set(coefficients) ^ set(expected))[0]
            return f"coefficients for '{key}' are missing or unexpected"
        pairs = zip(probe.weight_keys, probe.bias_keys, strict=True)
        for index, (weight, bias) in enumerate(pairs):
            free = torch.as_tensor(np.asarray(coefficients[weight], dtype=np.float32))[:-1]
            checks = [(weight, getattr(probe, f"source_w{index}"), free)]
            if bias is not None:
                own = coefficients.get(bias)
                bias_free = free.flatten(1) if own is None else torch.as_tensor(own)[:-1].float()
                checks.append((bias, getattr(probe, f"source_b{index}"), bias_free))
            for key, stack, coef in checks:
                want = combine_source_major(stack, coef).view(probe.shapes[key])
                got = state[key].float()
                if allow_fp16 and state[key].dtype == torch.float16:
                    want = want.half().float()
                scale = float(want.abs().max()) or 1.0
                gap = float((got - want).abs().max())
                if gap > (1e-3 if allow_fp16 else 1e-5) * scale:
                    return (
                        f"'{key}' is not the sources merged by the returned coefficients "
                        f"(largest difference {gap:.3g})"
                    )
        return None
