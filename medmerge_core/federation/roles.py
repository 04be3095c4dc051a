"""A node of the federation: its role, its private data (loaded once per message) and the
training steps it runs, each the core's own function called with plain values.

`Node.from_configs` reads the run config and the node config once; the ClientApp handlers
call `backbone` (institution), `merge` (coordinator), `train` / `evaluate` (site). The site's
steps live in `site_steps` (`SiteSteps`, which `Node` mixes in).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmerge_core.checkpointing import FitResult
from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.errors import DataUnavailable, InputError
from medmerge_core.federation.audit import audit_file
from medmerge_core.federation.config import FederationConfig, NodeSettings, node_settings
from medmerge_core.federation.data import load_node_data, parse_data_spec
from medmerge_core.federation.identity import prove_identity, read_token
from medmerge_core.federation.members import Member
from medmerge_core.federation.merge_rounds import ProbePlan
from medmerge_core.federation.protocol import BackboneInfo
from medmerge_core.federation.site_state import site_state_dir
from medmerge_core.federation.site_steps import SiteSteps, _cpu
from medmerge_core.federation.transport import ModelInfo
from medmerge_core.merge import MergedModel
from medmerge_core.models import StateDict, is_source_spec, load_source
from medmerge_core.pretrain import pretrain_source
from medmerge_core.probe import train_probe
from medmerge_core.settings import InMergeSettings, ProbeSettings, StageSettings
from medmerge_core.train import EVAL_BATCH_SIZE, FitOptions, Runtime, evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node(SiteSteps):
    """One node: who it is, what it holds, and the run's settings its role needs."""

    settings: NodeSettings
    data_spec: Mapping[str, Any] | None  # how to load its private data (None: it has none)
    arch: str
    seed: int
    batch_size: int
    pretrain: StageSettings
    probe: ProbeSettings  # the coordinator's budget, or one federated probe round's
    probe_lr: float
    probe_weight_decay: float
    ft: StageSettings
    inmerge: InMergeSettings | None  # applied before every local step (inmerge-local)
    fedbn_dir: Path | None  # where a site keeps its own norm layers under FedBN
    fp16: bool  # replies travel as fp16
    dp_clip: float | None  # dp = "client": clip the update here, before it leaves
    private: bool  # under DP a reply carries only the parameters DP covers (no BN statistics)
    release_metrics: bool  # exact metrics and pooled counts leave (always without DP)
    audit_path: Path  # one line per handled message (federation.audit)
    solo_threads: int  # CPU threads for work the other nodes wait on (merge, pretraining)

    @classmethod
    def from_configs(
        cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any], role: str | None = None
    ) -> Node:
        cfg = FederationConfig.from_run_config(run_config)
        settings = node_settings(node_config, cfg)
        if role is not None and settings.role != role:
            raise InputError(f"node '{settings.name}' has role '{settings.role}', not '{role}'")
        return cls(
            settings=settings,
            data_spec=None if settings.data is None else parse_data_spec(settings.data, cfg),
            arch=cfg.arch,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            pretrain=cfg.pretrain,
            probe=cfg.probe
            if cfg.probe_mode == "coordinator"
            else cfg.probe.per_round(cfg.probe_rounds),
            probe_lr=cfg.probe_lr,
            probe_weight_decay=cfg.probe_weight_decay,
            ft=cfg.ft,
            inmerge=cfg.inmerge_local,
            fedbn_dir=site_state_dir(settings, cfg) if cfg.fedbn else None,
            fp16=cfg.fp16,
            dp_clip=cfg.dp_clipping_norm if cfg.dp == "client" else None,
            private=cfg.dp != "none",
            release_metrics=cfg.dp == "none" or cfg.dp_release_metrics,
            audit_path=audit_file(settings, cfg),
            solo_threads=solo_threads(settings, cfg),
        )

    @property
    def name(self) -> str:
        return self.settings.name

    @cached_property
    def runtime(self) -> Runtime:
        return Runtime.detect(self.settings.device)

    @cached_property
    def task(self) -> TaskData:
        if self.data_spec is None:
            raise DataUnavailable(f"node '{self.name}': node config has no 'data'")
        try:
            return load_node_data(self.name, self.data_spec, self.settings.shard, self.seed)
        except (InputError, OSError) as exc:
            raise DataUnavailable(str(exc)) from exc

    @contextlib.contextmanager
    def _solo(self) -> Iterator[None]:
        """Torch's CPU threads raised to `solo_threads` for work the other nodes wait on."""
        before = torch.get_num_threads()
        torch.set_num_threads(max(before, self.solo_threads))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def member(self) -> Member:
        """Who this node says it is at discovery; a site also counts its training and test
        images (loading its data, so a wrong data path fails here, not in round 1)."""
        if self.settings.role != "site":
            return Member(self.settings.role, self.name)
        task = self.task
        return Member("site", self.name, len(task.train), len(task.test))

    def identity_proof(self, challenge: str) -> tuple[str | None, str | None]:
        """(the operator-signed identity, its proof for `challenge`); (None, None) without one."""
        token_path, key_path = self.settings.identity, self.settings.identity_key
        if token_path is None:
            return None, None
        if key_path is None:
            raise InputError(f"node '{self.name}': node config identity needs identity-key")
        token = read_token(Path(token_path).expanduser())
        return token, prove_identity(token, Path(key_path).expanduser(), challenge)

    def _metrics_out(self, metrics: dict[str, float], stage: str) -> dict[str, float]:
        """A stage's metrics as they leave; under DP without `dp-release-metrics` none do, and
        this node logs them for itself."""
        if self.release_metrics:
            return metrics
        log.info("%s %s (kept here, not sent): %s", self.name, stage, metrics)
        return {}

    # ------------------------------------------------------------------ institution

    def backbone(self) -> tuple[StateDict, BackboneInfo]:
        """The node's backbone: from its checkpoint or source spec, else pretrained on its data."""
        ckpt = self.settings.checkpoint
        if ckpt is not None and (is_source_spec(ckpt) or Path(ckpt).expanduser().exists()):
            channels = self.settings.in_channels
            if self.data_spec is not None and not is_source_spec(ckpt):
                channels = self.task.in_channels
            return _cpu(load_source(ckpt, self.arch, channels)), BackboneInfo(self.name)
        if self.data_spec is None:
            raise InputError(f"institution '{self.name}': node config needs checkpoint or data")
        if ckpt is None:
            raise InputError(
                f"institution '{self.name}': set node config checkpoint=PATH "
                "(where the backbone pretrained on its data is saved)"
            )
        with self._solo():
            metrics = pretrain_source(
                self.arch,
                self.task,
                Path(ckpt).expanduser(),
                self.pretrain,
                self.runtime,
                batch_size=self.batch_size,
                seed=self.seed,
                options=FitOptions(show_progress=False),
            )
        log.info("institution %s pretrained: %s", self.name, metrics)
        state = load_source(ckpt, self.arch, self.task.in_channels)
        return _cpu(state), BackboneInfo(self.name)

    # ------------------------------------------------------------------ coordinator

    def merge(
        self, sources: Sequence[StateDict], names: Sequence[str]
    ) -> tuple[StateDict, ModelInfo, dict[str, np.ndarray], dict[str, float]]:
        """Learn the MedMerge coefficients on local target data and bake a plain model: (its
        state, its description, the coefficients [d, ...] per merged key, metrics)."""
        info = self.target_info()
        with self._solo():
            probe, result = self._train_probe(self._probe(sources, names, info, self.seed),
                                              self.seed, "merge probe")  # fmt: skip
        model = self.runtime.model(probe.bake())
        task = self.task
        test = evaluate(model, BatchLoader(task.test, EVAL_BATCH_SIZE), self.runtime,
                        task.multilabel)  # fmt: skip
        metrics = {f"test_{k}": float(v) for k, v in test.items()}
        if result is not None:
            metrics.update({f"val_{k}": float(v) for k, v in result.best_val.items()})
        return _cpu(model.state_dict()), info, probe.coefficient_arrays(), metrics

    def _probe(
        self, sources: Sequence[StateDict], names: Sequence[str], info: ModelInfo, seed: int
    ) -> MergedModel:
        """The probe at its start, drawn from `seed` as every party of the merge draws it."""
        return ProbePlan(tuple(sources), tuple(names), info, self.probe, seed).probe()

    def _train_probe(
        self, probe: MergedModel, seed: int, name: str
    ) -> tuple[MergedModel, FitResult | None]:
        """The probe trained on this node's data (`train_probe`, the experiment's own step)."""
        task = self.task
        return train_probe(
            probe,
            BatchLoader(task.train, self.batch_size, shuffle=True, seed=seed),
            BatchLoader(task.val, EVAL_BATCH_SIZE),
            self.probe,
            self.probe_lr,
            self.probe_weight_decay,
            self.runtime,
            multilabel=task.multilabel,
            options=FitOptions(name=name, show_progress=False),
        )


def solo_threads(settings: NodeSettings, cfg: FederationConfig) -> int:
    """Threads for a node's solo work: `node-threads`, else the cores this process may use,
    shared in simulation among the nodes of its role that work at the same time (the
    institutions pretrain side by side; the coordinator probes alone)."""
    if cfg.node_threads > 0:
        return cfg.node_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    together = cfg.sim_roles.count(settings.role) if settings.simulated else 1
    return max(1, (cores or 1) // max(1, together))
