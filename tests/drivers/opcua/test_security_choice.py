"""Which endpoint ``security_mode: auto`` (and a fixed mode) picks from a server's offer."""

from __future__ import annotations

from typing import Any

import pytest
from asyncua import ua

from drivers.base import DriverContext, SeriesKey, SeriesTable
from drivers.opcua.config import OpcUaSource
from drivers.opcua.driver import OpcUaDriver
from edge.errors import ConnectError

URL = "opc.tcp://127.0.0.1:4840/x/"
NONE = ("None", ua.MessageSecurityMode.None_)
SIGN = ("Basic256Sha256", ua.MessageSecurityMode.Sign)
ENCRYPT = ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)
OLD_ENCRYPT = ("Basic256", ua.MessageSecurityMode.SignAndEncrypt)


def offer(*endpoints: tuple[str, Any]) -> list[Any]:
    return [
        ua.EndpointDescription(
            EndpointUrl=URL,
            SecurityMode=mode,
            SecurityPolicyUri=f"http://opcfoundation.org/UA/SecurityPolicy#{policy}",
        )
        for policy, mode in endpoints
    ]


def driver(**kw: Any) -> OpcUaDriver:
    cfg = OpcUaSource(
        area="a", device="m", endpoint=URL, nodes=[{"channel": "c", "node_id": "i=2258"}], **kw
    )
    table = SeriesTable([SeriesKey("tpo", "a", "m", "c", "", "opcua")])
    return OpcUaDriver(cfg, table, DriverContext(site="tpo"))


def chosen(d: OpcUaDriver, endpoints: list[Any]) -> tuple[str, Any] | None:
    ep = d._choose_endpoint(endpoints)
    return None if ep is None else (ep.SecurityPolicyUri.rsplit("#")[-1], ep.SecurityMode)


@pytest.mark.parametrize(
    ("offered", "want"),
    [
        ((NONE, SIGN, ENCRYPT), ENCRYPT),
        ((ENCRYPT, SIGN, NONE), ENCRYPT),
        ((NONE, SIGN), SIGN),
        ((SIGN,), SIGN),
        ((NONE,), None),
    ],
)
def test_auto_takes_the_strongest(offered: tuple[tuple[str, Any], ...], want: Any) -> None:
    assert chosen(driver(), offer(*offered)) == want


def test_auto_never_downgrades_to_none() -> None:
    # Secure, but only with a policy we do not use: refused rather than connecting unsecured.
    with pytest.raises(ConnectError, match=r"'m' at .*Basic256/SignAndEncrypt.*not falling back"):
        chosen(driver(), offer(NONE, OLD_ENCRYPT))
    # A policy asked for by name must be offered.
    with pytest.raises(ConnectError, match="no endpoint Basic256Sha256/Sign or SignAndEncrypt"):
        chosen(driver(security_policy="Basic256Sha256"), offer(NONE))


def test_fixed_mode_takes_exactly_that(tmp_path: Any) -> None:
    dirs = {"client_cert_dir": tmp_path, "trust_dir": tmp_path}
    assert chosen(driver(security_mode="Sign", **dirs), offer(NONE, SIGN, ENCRYPT)) == SIGN
    with pytest.raises(ConnectError, match="no endpoint Basic256Sha256/SignAndEncrypt"):
        chosen(driver(security_mode="SignAndEncrypt", **dirs), offer(NONE, SIGN))
