"""The shipped Envoy configuration strips exactly the header names the sidecar's proxy mode
strips (SPEC 5; `sidecar.headers` rule 1), before ext_authz sets the decided identity.

No Envoy runs here (no package); the removal rule is read from the YAML and checked against
`sidecar.headers.is_identity` over every spelling a client could send.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import yaml

from sidecar.headers import IDENTITY_HEADERS, is_identity
from tests.conftest import ROOT

ENVOY = ROOT / "deploy" / "envoy" / "envoy.yaml"
# What may stand between the words of a header name: an RFC 9110 token character that is not
# a letter or digit. Envoy keeps names lower-cased, so letters are compared in lower case.
SEPARATORS = "!#$%&'*+-.^_`|~"


def http_filters() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ENVOY.read_text())
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters: list[dict[str, Any]] = manager["typed_config"]["http_filters"]
    return filters


def removal_rules() -> list[re.Pattern[str]]:
    """The request-header removals configured before ext_authz, as full-match patterns."""
    names = [f["name"] for f in http_filters()]
    mutation = names.index("envoy.filters.http.header_mutation")
    assert mutation < names.index("envoy.filters.http.ext_authz")
    rules = []
    config = http_filters()[mutation]["typed_config"]
    for m in config["mutations"]["request_mutations"]:
        matcher = m["remove_on_match"]["key_matcher"]
        assert set(matcher) == {"safe_regex"}, matcher  # RE2: whole-name match
        rules.append(re.compile(matcher["safe_regex"]["regex"]))
    assert rules
    return rules


def removed(name: str, rules: list[re.Pattern[str]]) -> bool:
    return any(r.fullmatch(name.lower()) for r in rules)


def every_spelling(name: str) -> list[str]:
    words = name.lower().split("-")
    return [words[0] + "".join(s + w for s, w in zip(seps, words[1:], strict=True))
            for seps in itertools.product(SEPARATORS, repeat=len(words) - 1)]


def test_every_spelling_proxy_mode_strips_is_removed() -> None:
    rules = removal_rules()
    spellings = [s for h in IDENTITY_HEADERS for s in every_spelling(h)]
    assert len(spellings) == 2 * 15**2 + 2 * 15**3
    assert all(is_identity(s) for s in spellings)
    assert [s for s in spellings if not removed(s, rules)] == []


def test_nothing_else_is_removed() -> None:
    rules = removal_rules()
    near = ["x-tenant-idx", "x-tenants-id", "xx-tenant-id", "x-tenant", "x-tenantid",
            "x-api-token", "x-api-token-ids", "x-app-id-", "-x-app-id", "x--app-id",
            "y-tenant-id", "x-api-key", "authorization", "x-request-id", "x-tenant-name"]
    for name in near:
        assert removed(name, rules) == is_identity(name), name
    # One character changed, added or dropped anywhere in an identity name: removed exactly
    # when the sidecar would read it as an identity header.
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789" + SEPARATORS
    for header in IDENTITY_HEADERS:
        base = header.lower()
        for i in range(len(base) + 1):
            for c in alphabet:
                for variant in (base[:i] + c + base[i + 1:], base[:i] + c + base[i:],
                                base[:i] + base[i + 1:]):
                    assert removed(variant, rules) == is_identity(variant), variant


def test_the_decision_sets_the_four_names_it_was_allowed() -> None:
    authz = next(f for f in http_filters() if f["name"] == "envoy.filters.http.ext_authz")
    service = authz["typed_config"]["http_service"]
    assert service["path_prefix"] == "/_sidecar/auth"
    upstream = service["authorization_response"]["allowed_upstream_headers"]["patterns"]
    assert sorted(p["exact"] for p in upstream) == sorted(h.lower() for h in IDENTITY_HEADERS)
    assert authz["typed_config"]["failure_mode_allow"] is False
