"""A site's steps of `roles.Node` (fine-tuning, federated probe rounds, evaluation, FedBN norm
layers and what of a trained state leaves), apart from the institution's and coordinator's so
each role's code stays short; `Node` mixes them in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medmerge_core.checkpointing import FitResult
from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.errors import InputError
from medmerge_core.federation.config import NodeSettings
from medmerge_core.federation.privacy import clip_update
from medmerge_core.federation.site_state import FedBNStore
from medmerge_core.federation.transport import (
    ModelInfo,
    model_reference,
    parameter_keys,
    restore_dtypes,
)
from medmerge_core.inmerge import training_hook
from medmerge_core.merge import MergedModel
from medmerge_core.metrics import pooling_counts
from medmerge_core.models import StateDict
from medmerge_core.settings import InMergeSettings, StageSettings
from medmerge_core.train import (
    EVAL_BATCH_SIZE,
    FitOptions,
    Runtime,
    fit,
    predict,
    probabilities,
    scored,
)


def _cpu(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().cpu() for k, v in state.items()}


def _fit_metrics(result: FitResult | None) -> dict[str, float]:
    """A local stage's reply metrics: its last epoch's training loss and the validation metrics
    of the epoch it returns (its best)."""
    if result is None or not result.history:
        return {}
    metrics = {"train_loss": float(result.history[-1]["train_loss"])}
    return metrics | {f"val_{k}": float(v) for k, v in result.best_val.items()}


class SiteSteps:
    """The site's steps of a `Node`: its fields and the helpers below are `Node`'s own."""

    if TYPE_CHECKING:  # what these steps use of `Node` (roles.py)
        settings: NodeSettings
        arch: str
        seed: int
        batch_size: int
        ft: StageSettings
        inmerge: InMergeSettings | None
        fedbn_dir: Path | None
        dp_clip: float | None
        private: bool
        release_metrics: bool

        @property
        def runtime(self) -> Runtime: ...

        @property
        def task(self) -> TaskData: ...

        def _metrics_out(self, metrics: dict[str, float], stage: str) -> dict[str, float]: ...

        def _probe(
            self, sources: Sequence[StateDict], names: Sequence[str], info: ModelInfo, seed: int
        ) -> MergedModel: ...

        def _train_probe(
            self, probe: MergedModel, seed: int, name: str
        ) -> tuple[MergedModel, FitResult | None]: ...

    def _released(
        self, state: Mapping[str, torch.Tensor], sent: Sequence[str], parameters: Sequence[str]
    ) -> StateDict:
        """What of a trained state leaves: the keys that were sent, and under DP only the
        parameters the mechanism clips and noises (BN statistics stay here)."""
        allowed = set(parameters) if self.private else set(sent)
        return {k: state[k] for k in sent if k in allowed}

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
