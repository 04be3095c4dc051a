"""A site's private FedBN layers, kept on the site's own disk, one file per round, and its
final model (the federation's final.pt with the site's own norm layers).

Flower's per-node Context lives only as long as one run, and a restarted ServerApp is a new run.
Files keyed by round let a resumed run hand each site exactly the norm layers it had after the
last round the server checkpointed, so the resumed run matches an uninterrupted one bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path

from medmerge_core.federation.config import FederationConfig, NodeSettings
from medmerge_core.federation.transport import ModelInfo
from medmerge_core.io import atomic_torch_save, load_torch_file
from medmerge_core.models import StateDict

_FILE = re.compile(r"fedbn-round(\d+)\.pt")


DEPLOYED_STATE_DIR = "~/.medmerge/site-state"  # a hospital's own disk, not the server's path


def site_state_dir(settings: NodeSettings, cfg: FederationConfig) -> Path:
    """`state-dir` from the node config, else ~/.medmerge/site-state on the node's own disk
    (in simulation, every node shares the run folder); one subfolder per run name and site."""
    if settings.simulated and settings.state_dir is None:
        return cfg.run_dir / "sites" / settings.name
    root = settings.state_dir if settings.state_dir is not None else DEPLOYED_STATE_DIR
    return Path(root).expanduser() / cfg.run_name / settings.name


class FedBNStore:
    """Norm layers by round; keeps the newest `keep` rounds (a resumed round needs the one
    before the newest, which a crash may have left unacknowledged by the server)."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.dir = directory
        self.keep = keep

    def rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        found = (_FILE.fullmatch(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _path(self, server_round: int) -> Path:
        return self.dir / f"fedbn-round{server_round}.pt"

    def latest(self, up_to: float) -> StateDict | None:
        """The norm layers saved after the newest round <= up_to, or None."""
        usable = [r for r in self.rounds() if r <= up_to]
        if not usable:
            return None
        return load_torch_file(
            self._path(usable[-1]),
            "unreadable FedBN layers",
            "delete it to restart this site from the merged model's",
        )

    def save_final(self, state: StateDict, info: ModelInfo, image_size: int) -> Path:
        """This site's final model: the federation's final.pt with this site's norm layers."""
        path = self.dir / "final.pt"
        atomic_torch_save(info.checkpoint(state, image_size), path)
        return path

    def save(self, server_round: int, state: StateDict) -> None:
        atomic_torch_save(dict(state), self._path(server_round))
        for old in self.rounds()[: -self.keep]:
            self._path(old).unlink(missing_ok=True)
