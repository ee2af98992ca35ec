"""sidecar.routing (SPEC 3.2): path normalisation, scope and public-route matching.

The spellings below are the ones an attacker tries to make a path look like another one; each
must pick the scope of the path an upstream that decodes the path once would route to.
"""

from __future__ import annotations

import pytest

from sidecar.routing import (
    NO_SCOPE,
    PublicRoute,
    Router,
    ScopeRoute,
    match_path,
    normalize_path,
    parse_public_routes,
    parse_scope_routes,
)

DIFY = "/v1/datasets=dataset,/v1/workspaces/current/models=dataset,/=app"


@pytest.fixture
def dify() -> Router:
    return Router(parse_scope_routes(DIFY), parse_public_routes("GET /public,/health"))


@pytest.mark.parametrize(("raw", "forwarded"), [
    ("", "/"),
    ("/", "/"),
    ("/v1//datasets", "/v1/datasets"),
    ("//v1///datasets//", "/v1/datasets/"),
    ("/v1/./datasets", "/v1/datasets"),
    ("/v1/x/../datasets", "/v1/datasets"),
    ("/../../v1/datasets", "/v1/datasets"),  # `..` never climbs above the root
    ("/v1/datasets/..", "/v1/"),
    ("/v1/datasets/.", "/v1/datasets/"),
    ("/v1/%2e%2e/datasets", "/datasets"),  # %2e is an unreserved ".": decoded, then resolved
    ("/v1/%2E/datasets", "/v1/datasets"),
    ("/v1/%64atasets", "/v1/datasets"),
    ("/%7Euser", "/~user"),
    # Reserved escapes stay escaped in what is forwarded, upper-cased: %2F is data, not a "/".
    ("/v1%2fdatasets", "/v1%2Fdatasets"),
    ("/v1%2F..%2Fdatasets", "/v1%2F..%2Fdatasets"),
    ("/a%20b", "/a%20b"),
    ("/a%25b", "/a%25b"),
])
def test_normalize_path(raw: str, forwarded: str) -> None:
    assert normalize_path(raw) == forwarded


@pytest.mark.parametrize(("raw", "matched"), [
    ("/v1//datasets/x", "/v1/datasets/x"),
    ("/v1/./datasets/x", "/v1/datasets/x"),
    ("/v1/x/../datasets/x", "/v1/datasets/x"),
    ("/v1%2Fdatasets/x", "/v1/datasets/x"),
    ("/v1%2fdatasets%2fx", "/v1/datasets/x"),
    ("/v1/x/%2e%2e/datasets", "/v1/datasets"),
    ("/v1/x%2F%2e%2e%2Fdatasets", "/v1/datasets"),
    ("/v1/%2564atasets", "/v1/%64atasets"),  # every escape is decoded once, not twice
    ("/a%20b", "/a b"),
])
def test_match_path_is_the_most_decoded_form(raw: str, matched: str) -> None:
    assert match_path(raw) == matched


DATASET_SPELLINGS = [
    "/v1/datasets",
    "/v1/datasets/",
    "/v1/datasets/ds-1/documents",
    "/v1//datasets/ds-1",
    "/v1/./datasets/ds-1",
    "/v1/x/../datasets/ds-1",
    "/v1/x/%2e%2e/datasets",
    "/v1/x/%2E%2E/datasets",
    "/v1/%2e/datasets",
    "/v1/%64atasets",
    "/../v1/datasets",
    "//v1/datasets",
    "/public/../v1/datasets",
    "/public/%2e%2e/v1/datasets",
    "/v1/workspaces/current/models/model-types/llm",
    "/v1/workspaces//current/./models",
]
APP_SPELLINGS = [
    "/",
    "/v1/chat-messages",
    "/v1/datasets/../chat-messages",
    "/v1/datasets/%2e%2e/chat-messages",
    "/v1/datasetsx",
    "/v1/datasets.json",
    "/V1/datasets",  # paths are case-sensitive, as in the upstream
    "/v1/%2564atasets",
    "/v1/workspaces/current/modelsx",
    # `%2F` as a separator: /v1/chat-messages; as data: one segment under `/`. App either way.
    "/v1/datasets%2F..%2Fchat-messages",
]
# An escaped slash is a separator to upstreams that decode before routing (WSGI) and data to
# those that route first (aiohttp, Go): where the two readings need different scopes, no
# token may pass, whichever scope it has.
AMBIGUOUS_SPELLINGS = [
    "/v1%2Fdatasets/ds-1",  # dataset, or app
    "/v1%2fdatasets%2Fds-1",
    "/v1/x/%2E%2E%2Fdatasets",  # /v1/datasets, or /v1/<one segment>: app
    "/public%2F..%2Fv1/datasets",  # dataset, or app
    "/v1/datasets/x%2F..%2F..%2F..%2Fchat-messages",  # app, or /v1/datasets/{id}: dataset
]


@pytest.mark.parametrize("raw", DATASET_SPELLINGS)
def test_dataset_spellings_need_a_dataset_token(dify: Router, raw: str) -> None:
    for method in ("GET", "POST"):
        assert dify.required_scope(method, raw) == "dataset"


@pytest.mark.parametrize("raw", APP_SPELLINGS)
def test_app_spellings_need_an_app_token(dify: Router, raw: str) -> None:
    assert dify.required_scope("POST", raw) == "app"


@pytest.mark.parametrize("raw", AMBIGUOUS_SPELLINGS)
def test_escaped_slashes_read_two_ways_need_a_scope_no_token_has(
    dify: Router, raw: str
) -> None:
    assert dify.required_scope("GET", raw) is NO_SCOPE


@pytest.mark.parametrize(("method", "raw", "public"), [
    ("GET", "/public", True),
    ("GET", "/public/logo.png", True),
    ("get", "/public/logo.png", True),
    ("GET", "/public/%2e%2e/public/x", True),
    ("GET", "/v1/../public/x", True),
    ("POST", "/public/logo.png", False),  # `GET /public` covers GET only
    ("GET", "/publicity", False),
    ("GET", "/public/../v1/chat", False),
    ("GET", "/public/%2e%2e/v1/chat", False),
    ("GET", "/public%2F..%2Fv1/chat", False),
    ("GET", "/public%2Fx", False),  # public only if both readings of %2F are
    ("DELETE", "/health", True),  # no method: every method
    ("GET", "/health/../v1/datasets", False),
])
def test_public_routes(dify: Router, method: str, raw: str, public: bool) -> None:
    assert (dify.required_scope(method, raw) is None) is public


def test_longest_prefix_wins_and_uncovered_paths_fail_closed() -> None:
    router = Router(parse_scope_routes("/a=one,/a/b=two,/a/b/c=three"), ())
    assert router.required_scope("GET", "/a/b/c/d") == "three"
    assert router.required_scope("GET", "/a/b/x") == "two"
    assert router.required_scope("GET", "/a/x") == "one"
    assert router.required_scope("GET", "/a/b/c/../x") == "two"
    # No `/` route: what no prefix covers needs the empty scope, which no token has.
    assert router.required_scope("GET", "/other") is NO_SCOPE


def test_parse_routes() -> None:
    assert parse_scope_routes(" /v1//datasets/ = dataset , /=app ") == (
        ScopeRoute("/v1/datasets/", "dataset"), ScopeRoute("/", "app"))
    assert parse_public_routes("get /a, /b/c") == (
        PublicRoute(None, "/b/c"), PublicRoute("GET", "/a"))
    for bad in ("", "/a", "a=app", "/a=", "/a=x y", "/a=app,/a=dataset"):
        with pytest.raises(ValueError, match=r"."):
            parse_scope_routes(bad)
    for bad in ("a", "GET", "GET /a /b", "G3T /a"):
        with pytest.raises(ValueError, match=r"."):
            parse_public_routes(bad)


# Found while testing the decision endpoint: when match_path alone decided, `x%2F..%2F..`
# climbed out of a protected prefix into a public one, while an upstream that does not split
# on `%2F` (aiohttp, Go's net/http with RawPath) still routes the request (forwarded as
# `normalize_path(raw)`, `%2F`s kept) to `/v1/datasets/{id}` with id "x/../../../public".


@pytest.mark.parametrize("raw", [
    "/v1/datasets/x%2F..%2F..%2F..%2Fpublic",
    "/v1/datasets/x%2F%2e%2e%2F%2e%2e%2F%2e%2e%2Fpublic",
    "/v1/datasets/x%2F..%2F..%2F..%2Fpublic%2Flogo.png",
])
def test_escaped_slash_dot_segments_cannot_climb_into_a_public_route(
    dify: Router, raw: str
) -> None:
    assert normalize_path(raw).startswith("/v1/datasets/")  # where the upstream routes it
    assert match_path(raw).startswith("/public")  # what the fully decoded reading sees
    assert dify.required_scope("GET", raw) == "dataset"
