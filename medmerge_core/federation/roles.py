"""A node of the federation: its role, its private data (loaded once per message) and the
training steps it runs, each the core's own function called with plain values.

`Node.from_configs` reads the run config and the node config once; the ClientApp handlers
call `backbone` (institution), `merge` (coordinator), `train` / `evaluate` (site).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmerge_core.checkpointing import FitResult
from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.errors import DataUnavailable, InputError
from medmerge_core.federation.audit import audit_file
from medmerge_core.federation.config import FederationConfig, NodeSettings, node_settings
from medmerge_core.federation.data import load_node_data, parse_data_spec
from medmerge_core.federation.identity import prove_identity, read_token
from medmerge_core.federation.members import Member
from medmerge_core.federation.merge_rounds import ProbePlan
from medmerge_core.federation.privacy import clip_update
from medmerge_core.federation.protocol import BackboneInfo
from medmerge_core.federation.site_state import FedBNStore, site_state_dir
from medmerge_core.federation.transport import (
    ModelInfo,
    model_reference,
    parameter_keys,
    restore_dtypes,
)
from medmerge_core.inmerge import training_hook
from medmerge_core.merge import MergedModel
from medmerge_core.metrics import pooling_counts
from medmerge_core.models import StateDict, is_source_spec, load_source
from medmerge_core.pretrain import pretrain_source
from medmerge_core.probe import train_probe
from medmerge_core.settings import InMergeSettings, ProbeSettings, StageSettings
from medmerge_core.train import (
    EVAL_BATCH_SIZE,
    FitOptions,
    Runtime,
    evaluate,
    fit,
    predict,
    probabilities,
    scored,
)

log = logging.getLogger(__name__)


def _cpu(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().cpu() for k, v in state.items()}


def _fit_metrics(result: FitResult | None) -> dict[str, float]:
    """A local stage's reply metrics: its last epoch's training loss and the validation metrics
    of the epoch it returns (its best)."""
    if result is None or not result.history:
        return {}
    metrics = {"train_loss": float(result.history[-1]["train_loss"])}
    return metrics | {f"val_{k}": float(v) for k, v in result.best_val.items()}


@dataclass(frozen=True)
class Node:
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
            probe=cfg.merge
            if cfg.merge_mode == "coordinator"
            else cfg.merge.per_round(cfg.merge_rounds),
            probe_lr=cfg.merge_lr,
            probe_weight_decay=cfg.merge_weight_decay,
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

    def _released(
        self, state: Mapping[str, torch.Tensor], sent: Sequence[str], parameters: Sequence[str]
    ) -> StateDict:
        """What of a trained state leaves: the keys that were sent, and under DP only the
        parameters the mechanism clips and noises (BN statistics stay here)."""
        allowed = set(parameters) if self.private else set(sent)
        return {k: state[k] for k in sent if k in allowed}

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

    # ------------------------------------------------------------------ site

    def local_norm(
        self, up_to: int, initial: StateDict | None, phase: str = "finetune"
    ) -> StateDict | None:
        """FedBN: this site's own norm layers after round `up_to` or earlier of `phase`
        ("probe" or "finetune"; fine-tuning starts from the site's last federated-probe layers
        when it has some), else `initial` (the server's start); None without FedBN."""
        if self.fedbn_dir is None:
            return None
        if phase == "probe":
            saved = self._probe_norms().latest(up_to)
        else:
            saved = FedBNStore(self.fedbn_dir).latest(up_to)
            if saved is None:
                saved = self._probe_norms().latest(math.inf)  # the probe's last round
        return saved if saved is not None else initial

    def _probe_norms(self) -> FedBNStore:
        assert self.fedbn_dir is not None
        return FedBNStore(self.fedbn_dir / "probe")

    def _round_seed(self, server_round: int) -> int:
        """The seed of this site's local work in a round: the run's seed in round 1 at the
        first shard (as the coordinator's), distinct for every other round and shard."""
        shard = (self.settings.shard or (0, 1))[0]
        return self.seed + 1_000_003 * (server_round - 1) + 101 * shard

    def _check_target(self, info: ModelInfo) -> None:
        task = self.task
        if (task.num_classes, task.in_channels) != (info.num_classes, info.in_channels):
            raise InputError(
                f"site data has {task.num_classes} classes / {task.in_channels} channels, the "
                f"merged model {info.num_classes} / {info.in_channels}"
            )

    def target_info(self) -> ModelInfo:
        """The model this site's target data needs (the server's federated probe start)."""
        return ModelInfo(self.arch, self.task.num_classes, self.task.in_channels)

    def _clip(
        self, state: StateDict, sent: Mapping[str, torch.Tensor], parameters: Sequence[str]
    ) -> StateDict:
        """dp = "client": the update on the sent parameters clipped here, before it leaves."""
        if self.dp_clip is None:
            return state
        keys = [k for k in sent if k in set(parameters)]
        return clip_update(state, sent, keys, self.dp_clip)

    def _model(
        self,
        state: Mapping[str, torch.Tensor],
        info: ModelInfo,
        local_norm: Mapping[str, torch.Tensor] | None,
    ) -> nn.Module:
        self._check_target(info)
        model = info.build()
        full = model.state_dict()
        full.update(state)
        full.update(local_norm or {})
        model.load_state_dict(restore_dtypes(full, model.state_dict()))
        return self.runtime.model(model)

    def train(
        self,
        state: Mapping[str, torch.Tensor],
        info: ModelInfo,
        server_round: int,
        local_norm: Mapping[str, torch.Tensor] | None,
    ) -> tuple[StateDict, int, dict[str, float]]:
        """Fine-tune the global model locally; returns (new state, examples, metrics). Under
        FedBN the new norm layers are saved on this node's disk first."""
        task = self.task
        model = self._model(state, info, local_norm)
        seed = self._round_seed(server_round)
        torch.manual_seed(seed)
        result = fit(
            model,
            BatchLoader(task.train, self.batch_size, shuffle=True, seed=seed),
            BatchLoader(task.val, EVAL_BATCH_SIZE),
            self.ft,
            self.runtime,
            multilabel=task.multilabel,
            before_step=None if self.inmerge is None else training_hook(self.inmerge, seed),
            options=FitOptions(name=f"round {server_round}", show_progress=False),
        )
        out = _cpu(model.state_dict())
        meta, _, norm = model_reference(info)
        if self.fedbn_dir is not None:
            FedBNStore(self.fedbn_dir).save(server_round, {k: out[k] for k in norm})
        parameters = parameter_keys(info)
        out = self._clip(out, restore_dtypes(state, meta), parameters)
        released = self._released(out, list(state), parameters)
        return released, len(task.train), self._metrics_out(_fit_metrics(result), "training")

    def probe_round(
        self,
        sources: Sequence[StateDict],
        names: Sequence[str],
        state: Mapping[str, torch.Tensor],
        info: ModelInfo,
        server_round: int,
        local_norm: Mapping[str, torch.Tensor] | None,
    ) -> tuple[StateDict, int, dict[str, float]]:
        """One round of the federated probe: the coordinator's training step (`train_probe`,
        the probe's budget, best epoch on this site's validation data) from the server's probe
        state; returns (new probe state, examples, metrics). Under FedBN this site's norm
        layers stay here, on its disk."""
        self._check_target(info)
        seed = self._round_seed(server_round)
        probe = self._probe(sources, names, info, seed)
        start = probe.probe_state()
        sent = restore_dtypes(state, start)
        probe.load_probe_state({**start, **sent, **(local_norm or {})})
        probe, result = self._train_probe(probe, seed, f"probe round {server_round}")
        out = probe.probe_state()
        if self.fedbn_dir is not None:
            norm = model_reference(info)[2]
            self._probe_norms().save(server_round, {k: out[k] for k in norm})
        parameters = probe.probe_parameter_keys()
        out = self._clip(out, sent, parameters)
        released = self._released(out, list(state), parameters)
        return released, len(self.task.train), self._metrics_out(_fit_metrics(result), "probe")

    def evaluate(
        self,
        state: Mapping[str, torch.Tensor],
        info: ModelInfo,
        local_norm: Mapping[str, torch.Tensor] | None,
        final: bool = False,
    ) -> tuple[int, dict[str, float], dict[str, Any]]:
        """(test images, test metrics, the counts that pool them over sites; empty for a
        multi-label task) of the global model, with this site's norm layers under FedBN. For
        the final model under FedBN, this site's own final model is saved on its disk."""
        model = self._model(state, info, local_norm)
        task = self.task
        logits, labels = predict(model, BatchLoader(task.test, EVAL_BATCH_SIZE), self.runtime)
        metrics = {k: float(v) for k, v in scored(logits, labels, task.multilabel).items()}
        counts = {} if task.multilabel else pooling_counts(probabilities(logits), labels)
        if final and self.fedbn_dir is not None:
            own = _cpu(model.state_dict())
            FedBNStore(self.fedbn_dir).save_final(own, info, task.image_size)
        if not self.release_metrics:
            return len(task.test), self._metrics_out(metrics, "evaluation"), {}
        return len(task.test), metrics, counts


def solo_threads(settings: NodeSettings, cfg: FederationConfig) -> int:
    """Threads for a node's solo work: `node-threads`, else the cores this process may use,
    shared in simulation among the nodes of its role that work at the same time (the
    institutions pretrain side by side; the coordinator probes alone)."""
    if cfg.node_threads > 0:
        return cfg.node_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    together = cfg.sim_roles.count(settings.role) if settings.simulated else 1
    return max(1, (cores or 1) // max(1, together))
