"""Config validation of the OPC UA driver (no server needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from drivers.opcua.config import OpcUaNode, OpcUaSource, parse_browse_path
from sim.opcua import MACHINE_TOOL_CHANNELS, PACKML_CHANNELS, SIM_NAMESPACES


def _source(**kw: object) -> OpcUaSource:
    base: dict[str, object] = {
        "area": "hall1",
        "device": "Mill-1",
        "endpoint": "opc.tcp://127.0.0.1:4840",
        "namespaces": SIM_NAMESPACES,
        "nodes": [{"channel": "a", "browse_path": "ma:Machines/sim:Mill-1/mt:Monitoring"}],
    }
    base.update(kw)
    return OpcUaSource.model_validate(base)


def test_browse_path_segments_inherit_namespace() -> None:
    assert parse_browse_path("ma:Machines/sim:M/Foo/2:Bar") == [
        ("ma", "Machines"),
        ("sim", "M"),
        (None, "Foo"),
        ("2", "Bar"),
    ]
    with pytest.raises(ValueError, match="first segment"):
        parse_browse_path("Machines/M")


def test_node_needs_exactly_one_address() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        OpcUaNode(channel="x")
    with pytest.raises(ValidationError, match="exactly one"):
        OpcUaNode(channel="x", browse_path="0:Server", node_id="i=2253")
    assert OpcUaNode(channel="x", node_id="i=2253").mode == "subscribe"


def test_duplicate_channels_rejected() -> None:
    node = {"channel": "a", "node_id": "i=1"}
    with pytest.raises(ValidationError, match="duplicate channel 'a'"):
        _source(nodes=[node, node])


def test_empty_nodes_rejected() -> None:
    with pytest.raises(ValidationError, match="nodes"):
        _source(nodes=[])


def test_unknown_alias_rejected() -> None:
    with pytest.raises(ValidationError, match="alias 'xx'"):
        _source(nodes=[{"channel": "a", "browse_path": "xx:Machines"}])


@pytest.mark.parametrize(
    ("policy", "mode", "ok"),
    [
        ("None", "None", True),
        ("Basic256Sha256", "Sign", True),
        ("Basic256Sha256", "SignAndEncrypt", True),
        ("None", "Sign", False),
        ("Basic256Sha256", "None", False),
        ("auto", "auto", True),
        ("Basic256Sha256", "auto", True),
        ("auto", "SignAndEncrypt", True),
        ("None", "auto", True),
        ("auto", "None", True),
    ],
)
def test_security_consistency(policy: str, mode: str, ok: bool, tmp_path: object) -> None:
    kw = {"security_policy": policy, "security_mode": mode}
    if mode in {"Sign", "SignAndEncrypt"}:
        kw |= {"client_cert_dir": str(tmp_path), "trust_dir": str(tmp_path)}
    if ok:
        assert _source(**kw).security_mode == mode
    else:
        with pytest.raises(ValidationError, match="security_policy"):
            _source(**kw)


def test_security_defaults_to_auto() -> None:
    src = _source()
    assert (src.security_policy, src.security_mode) == ("auto", "auto")
    assert src.security_auto
    assert not src.security_off
    # Either field set to None opts out on purpose; auto on the other side follows.
    assert _source(security_mode="None").security_off
    assert _source(security_policy="None").security_off
    assert not _source(security_policy="None").security_auto
    # A fixed secure mode needs the certificate and trust directories up front; auto asks
    # for them only when the server turns out to offer security.
    with pytest.raises(ValidationError, match="client_cert_dir and trust_dir"):
        _source(security_mode="Sign")


def test_extra_field_and_secret_shape() -> None:
    with pytest.raises(ValidationError, match="password"):
        _source(password="hunter2")  # the secret itself never goes into YAML
    with pytest.raises(ValidationError, match="go together"):
        _source(username="op")
    assert _source(username="op", password_env="OPCUA_PW").password_env == "OPCUA_PW"


def test_channel_specs_follow_sim_table() -> None:
    src = _source(
        nodes=[
            {
                "channel": c.channel,
                "browse_path": c.browse_path("Mill-1"),
                "unit": c.unit,
                "codes": c.codes,
            }
            for c in MACHINE_TOOL_CHANNELS
        ]
    )
    specs = src.channel_specs()
    assert [s.channel for s in specs] == [c.channel for c in MACHINE_TOOL_CHANNELS]
    assert specs[0].codes == ("NotAvailable", "OutOfService", "NotExecuting", "Executing")
    assert {s.device for s in specs} == {"Mill-1"}
    assert all(c.channel.count(".") >= 1 for c in PACKML_CHANNELS)


def test_sample_yaml_is_valid() -> None:
    from pathlib import Path

    import yaml

    import drivers.opcua

    path = Path(drivers.opcua.__file__).with_name("sample.yaml")
    src = OpcUaSource.model_validate(yaml.safe_load(path.read_text()))
    assert src.security_mode == "SignAndEncrypt"
    assert {n.mode for n in src.nodes} == {"subscribe", "poll"}
