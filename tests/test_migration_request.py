"""``MigrationRequest``: one value for a migration, its keyword adapter, and every rule between its
fields refused with ``InvalidArgument`` before anything is sent."""

from __future__ import annotations

from typing import Any

import pytest

from vmctl.errors import InvalidArgument
from vmctl.model import ConvergencePolicy, MigrationRequest
from vmctl.model.tls import TLSCreds


def test_keywords_make_the_request_and_the_policy_keywords_its_convergence_policy() -> None:
    request = MigrationRequest.of(bandwidth=5, listen=("10.0.0.2", 4444), finish_within=60, allow_postcopy=True)
    assert request == MigrationRequest(
        bandwidth=5,
        listen=("10.0.0.2", 4444),
        policy=ConvergencePolicy(finish_within=60, allow_postcopy=True),
    )
    assert MigrationRequest.of() == MigrationRequest() and MigrationRequest().policy is None


def test_a_request_passes_through_the_adapter_whole() -> None:
    request = MigrationRequest(postcopy=True)
    assert MigrationRequest.of(request) is request


def test_a_request_and_keywords_together_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="not both"):
        MigrationRequest.of(MigrationRequest(), postcopy=True)


def test_an_unknown_keyword_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match="takes no bandwith"):
        MigrationRequest.of(bandwith=5)  # type: ignore[call-arg]


def test_the_policys_keywords_at_their_defaults_need_no_finish_within() -> None:
    assert MigrationRequest.of(allow_throttle=True, allow_postcopy=False, max_downtime_ms=None).policy is None


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"allow_postcopy": True}, "need finish_within"),
        ({"max_downtime_ms": 500}, "need finish_within"),
        ({"allow_compression": False}, "need finish_within"),
        ({"finish_within": 0}, "finish_within must be a positive number"),
        ({"finish_within": 60, "max_downtime_ms": 0}, "max_downtime_ms must be a positive whole number"),
        ({"finish_within": 60, "auto_converge": True}, "give allow_throttle instead"),
        ({"finish_within": 60, "downtime_limit": 1000, "max_downtime_ms": 500}, "above max_downtime_ms 500"),
        ({"postcopy": True, "multifd_channels": 2}, "postcopy and multifd cannot be combined"),
        ({"target_tls": TLSCreds(dir="/tls")}, "target_tls needs tls"),
        ({"postcopy": 1}, "postcopy must be True or False"),
        ({"bandwidth": 0}, "bandwidth must be a positive whole number"),
        ({"downtime_limit": 2_000_001}, "downtime_limit must be at most"),
        ({"storage_timeout": float("inf")}, "storage_timeout must be a positive number"),
        ({"listen": "10.0.0.2:4444"}, "listen must be a"),
        ({"tls": "/tls"}, "tls must be TLSCreds"),
    ],
)
def test_a_bad_request_is_refused_with_invalid_argument(keywords: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        MigrationRequest.of(**keywords)


def test_the_same_rules_hold_for_a_request_built_directly() -> None:
    with pytest.raises(InvalidArgument, match="give allow_throttle instead"):
        MigrationRequest(auto_converge=True, policy=ConvergencePolicy(finish_within=10))
    with pytest.raises(InvalidArgument, match="policy must be a ConvergencePolicy"):
        MigrationRequest(policy=10)  # type: ignore[arg-type]
