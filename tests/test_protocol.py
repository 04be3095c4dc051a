"""The wire protocol (medmerge_core.federation.protocol): its values are what deployed sites
speak, so they are pinned here; the `info` layouts round-trip and name the unusable field."""

from __future__ import annotations

import pytest
from flwr.app import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from medmerge_core.errors import InputError
from medmerge_core.federation import protocol
from medmerge_core.federation.members import Member, read_member
from medmerge_core.federation.protocol import BackboneInfo, ModelDescription, NodeInfo
from medmerge_core.federation.transport import ModelInfo


def test_the_wire_values_are_the_deployed_ones() -> None:
    assert protocol.MESSAGE_TYPES == (
        "query.info", "query.target", "query.backbone", "train.merge", "train.probe", "train",
        "evaluate",
    )  # fmt: skip
    assert (protocol.TRAIN, protocol.EVALUATE) == (MessageType.TRAIN, MessageType.EVALUATE)
    assert protocol.SECAGG_RECORD == RECORD_KEY_CONFIGS
    assert [protocol.action(t) for t in protocol.MESSAGE_TYPES[:5]] == [
        "info", "target", "backbone", "merge", "probe",
    ]  # fmt: skip
    records = (protocol.ARRAYS, protocol.CONFIG, protocol.INFO, protocol.METRICS,
               protocol.POOLED, protocol.COEFFICIENTS, protocol.LOCAL_INIT)  # fmt: skip
    assert records == ("arrays", "config", "info", "metrics", "pooled", "coefficients",
                       "local-init")  # fmt: skip
    assert (protocol.source_key(2), protocol.probe_source_key(0)) == ("source-2", "probe-source-0")
    config = (protocol.CHALLENGE, protocol.ARCH, protocol.NAMES, protocol.SOURCES_DIGEST,
              protocol.SERVER_ROUND, protocol.FINAL, protocol.SECAGG_KEYS,
              protocol.SECAGG_WEIGHT)  # fmt: skip
    assert config == ("challenge", "arch", "names", "sources-digest", "server-round", "final",
                      "secagg-keys", "secagg-weight")  # fmt: skip
    assert protocol.NUM_EXAMPLES == "num-examples"
    assert protocol.FITRES_PARAMETERS == "fitres.parameters"


def test_node_info_round_trips_in_the_order_it_travels() -> None:
    info = Member("site", "s1", 30, 10).info("token", "proof")
    record = info.as_config()
    assert list(record) == ["role", "name", "train-examples", "test-examples",
                            "identity-token", "identity-proof"]  # fmt: skip
    assert NodeInfo.from_config(record) == info
    assert Member("institution", "a").info().as_config() == {"role": "institution", "name": "a"}
    assert read_member(record, "", "") == Member("site", "s1", 30, 10)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"role": 3, "name": "a"}, "role: expected str, got int"),
        ({"role": "site", "name": "a", "train-examples": -1}, "train-examples must be"),
        ({"role": "site", "name": "a", "test-examples": True}, "test-examples must be"),
        ({"role": "site", "name": "a", "identity-token": 5}, "identity-token: expected str"),
    ],
)
def test_node_info_names_the_unusable_field(record: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        NodeInfo.from_config(record)


def test_model_description_is_model_info_on_the_wire() -> None:
    info = ModelInfo("resnet18", 3, 1)
    record = info.as_config()
    assert record == {"arch": "resnet18", "num-classes": 3, "in-channels": 1}
    assert ModelInfo.from_config({**record, "server-round": 2}) == info
    assert type(ModelInfo.from_config(record)) is ModelInfo
    assert ModelDescription.from_config(record) == ModelDescription("resnet18", 3, 1)
    with pytest.raises(InputError, match=r"^num-classes: missing$"):
        ModelInfo.from_config({"arch": "resnet18", "in-channels": 1})
    with pytest.raises(InputError, match=r"^in-channels: expected an integer, got 'x'$"):
        ModelInfo.from_config({**record, "in-channels": "x"})


def test_backbone_info() -> None:
    assert BackboneInfo("a").as_config() == {"source": "a"}
    assert BackboneInfo.from_config({"source": "a"}) == BackboneInfo("a")
    with pytest.raises(InputError, match=r"^source: expected a string, got NoneType$"):
        BackboneInfo.from_config({})
