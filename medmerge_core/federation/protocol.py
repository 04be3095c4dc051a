"""The wire protocol between the ServerApp and the nodes, without Flower: every message type,
record key and config key, named once, and the layouts of the replies' `info` records.

client/ and server/ import these names instead of writing the strings, so the two sides (and
the site policy, which lists the message types a site serves) cannot drift apart. The values
are the wire format deployed sites already speak: changing one is a protocol change, and
tests/test_protocol.py pins them. A layout's `from_config` checks the fields it reads and says
in one line which one is unusable (InputError, a ValueError).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from medmerge_core.errors import InputError

# ---------------------------------------------------------------- message types
# "<category>.<action>": Flower routes "query.info" to the ClientApp's @app.query("info").
QUERY_INFO = "query.info"  # discovery: who are you (`NodeInfo`)
QUERY_TARGET = "query.target"  # a site: what model does your target data need (`ModelDescription`)
QUERY_BACKBONE = "query.backbone"  # an institution: your backbone (`BackboneInfo`)
TRAIN_MERGE = "train.merge"  # the coordinator: learn the merge on your data
TRAIN_PROBE = "train.probe"  # a site: one round of the federated merge probe
TRAIN = "train"  # a site: one fine-tuning round (Flower's MessageType.TRAIN)
EVALUATE = "evaluate"  # a site: score the global model (Flower's MessageType.EVALUATE)
MESSAGE_TYPES: tuple[str, ...] = (
    QUERY_INFO,
    QUERY_TARGET,
    QUERY_BACKBONE,
    TRAIN_MERGE,
    TRAIN_PROBE,
    TRAIN,
    EVALUATE,
)
# The messages whose reply is a site's model update in a federated round.
UPDATE_MESSAGES: tuple[str, ...] = (TRAIN, TRAIN_PROBE)


def action(message_type: str) -> str:
    """The handler's action name of a "<category>.<action>" type ("query.info" -> "info")."""
    return message_type.partition(".")[2]


# ---------------------------------------------------------------- records of a message
ARRAYS = "arrays"  # ArrayRecord: the model (or probe) state sent or returned
CONFIG = "config"  # ConfigRecord: what the server asks with (the config keys below)
INFO = "info"  # ConfigRecord of a query or merge reply: one of the layouts below
METRICS = "metrics"  # MetricRecord: a reply's metrics (with NUM_EXAMPLES for rounds)
POOLED = "pooled"  # MetricRecord of an evaluate reply: counts pooled over the sites
COEFFICIENTS = "coefficients"  # ArrayRecord of the merge reply: the learned coefficients
LOCAL_INIT = "local-init"  # ArrayRecord under FedBN: the norm layers a site starts from
SOURCE_PREFIX = "source-"  # ArrayRecords "source-0", "source-1", ...: the source backbones


def source_key(index: int) -> str:
    """The record of source backbone `index` (train.merge, the probe's first message)."""
    return f"{SOURCE_PREFIX}{index}"


# ---------------------------------------------------------------- keys of the `config` record
CHALLENGE = "challenge"  # query.info: the nonce a node signs to prove its identity
ARCH = "arch"  # query.backbone, train.merge (and the model description)
NAMES = "names"  # train.merge, train.probe: the sources' names, in source order
SOURCES_DIGEST = "sources-digest"  # train.probe: the digest a site caches the sources under
SERVER_ROUND = "server-round"  # train, train.probe, evaluate
FINAL = "final"  # evaluate: the last evaluation, of the final model
SECAGG_KEYS = "secagg-keys"  # train under SecAgg+: the keys to send as deltas, in order
SECAGG_WEIGHT = "secagg-weight"  # train under SecAgg+: this site's weight in the masked sum

# ---------------------------------------------------------------- keys of a reply's metrics
NUM_EXAMPLES = "num-examples"  # train, train.probe, evaluate: the examples it used
POOLED_KEYS: tuple[str, ...] = ("confusion", "positive", "negative")  # the POOLED record

# ---------------------------------------------------------------- SecAgg+ (Flower's own layout)
SECAGG_RECORD = "secaggplus_configs"  # Flower's RECORD_KEY_CONFIGS: a SecAgg+ stage's record
# The training reply in the legacy layout Flower's secaggplus_mod reads (and masks).
FITRES_PARAMETERS = "fitres.parameters"
FITRES_NUM_EXAMPLES = "fitres.num_examples"
FITRES_METRICS = "fitres.metrics"
FITRES_STATUS = "fitres.status"
LEGACY_NUM_EXAMPLES = "num_examples"  # the key in FITRES_NUM_EXAMPLES

# ---------------------------------------------------------------- a site's run state (local)
# Kept in the node's `context.state` between messages of a run; never on the wire.
PROBE_SOURCES = "probe-sources"  # ConfigRecord {DIGEST: the cached sources' digest}
PROBE_SOURCE_PREFIX = "probe-source-"  # ArrayRecords "probe-source-0", ...
DIGEST = "digest"


def probe_source_key(index: int) -> str:
    """Where a site keeps source backbone `index` of the federated probe."""
    return f"{PROBE_SOURCE_PREFIX}{index}"


# ---------------------------------------------------------------- the `info` layouts
# The keys of each layout (the ModelDescription's are also part of every round's config).
ROLE, NAME = "role", "name"
TRAIN_EXAMPLES, TEST_EXAMPLES = "train-examples", "test-examples"
IDENTITY_TOKEN, IDENTITY_PROOF = "identity-token", "identity-proof"
NUM_CLASSES, IN_CHANNELS = "num-classes", "in-channels"
SOURCE = "source"


def _read(record: Mapping[str, Any], key: str, convert: Callable[[Any], Any], what: str) -> Any:
    """`convert(record[key])`, or InputError naming the field that is missing or unusable."""
    if key not in record:
        raise InputError(f"{key}: missing")
    try:
        return convert(record[key])
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{key}: expected {what}, got {str(record[key])[:40]!r}") from None


def _optional(record: Mapping[str, Any], key: str, kind: type) -> Any:
    """`record[key]` when it is a `kind` (absent or None: None); InputError otherwise."""
    value = record.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise InputError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class NodeInfo:
    """The `query.info` reply's info: who a node says it is (role and name; a site's training
    and test set sizes), and with operator-signed identities its token and the proof for the
    server's challenge. Only the layout is checked here; `members.read_member` decides whom
    to admit."""

    role: str = ""
    name: str = ""
    train_examples: int | None = None
    test_examples: int | None = None
    identity_token: str | None = None
    identity_proof: str | None = None

    def as_config(self) -> dict[str, Any]:
        """The record as sent: fields that are None are left out."""
        fields = {
            ROLE: self.role,
            NAME: self.name,
            TRAIN_EXAMPLES: self.train_examples,
            TEST_EXAMPLES: self.test_examples,
            IDENTITY_TOKEN: self.identity_token,
            IDENTITY_PROOF: self.identity_proof,
        }
        return {k: v for k, v in fields.items() if v is not None}

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> Self:
        counts = []
        for key in (TRAIN_EXAMPLES, TEST_EXAMPLES):
            value = record.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise InputError(f"{key} must be a non-negative integer, got {value!r}")
            counts.append(value)
        return cls(
            _optional(record, ROLE, str) or "",
            _optional(record, NAME, str) or "",
            *counts,
            _optional(record, IDENTITY_TOKEN, str),
            _optional(record, IDENTITY_PROOF, str),
        )


@dataclass(frozen=True)
class ModelDescription:
    """What rebuilds the merged model: the `info` of the `query.target` and `train.merge`
    replies, and part of the config of every fine-tuning and evaluation message
    (`transport.ModelInfo` adds the model itself)."""

    arch: str
    num_classes: int
    in_channels: int

    def as_config(self) -> dict[str, Any]:
        return {ARCH: self.arch, NUM_CLASSES: self.num_classes, IN_CHANNELS: self.in_channels}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """From a record that may hold other keys too (a round's config)."""
        return cls(
            _read(config, ARCH, str, "a string"),
            _read(config, NUM_CLASSES, int, "an integer"),
            _read(config, IN_CHANNELS, int, "an integer"),
        )


@dataclass(frozen=True)
class BackboneInfo:
    """The `query.backbone` reply's info: whose backbone it is, in the institution's words
    (the server files it under the name it admitted the node as)."""

    source: str

    def as_config(self) -> dict[str, Any]:
        return {SOURCE: self.source}

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> Self:
        source = record.get(SOURCE)
        if not isinstance(source, str):
            raise InputError(f"{SOURCE}: expected a string, got {type(source).__name__}")
        return cls(source)
