from __future__ import annotations

import pytest

from sidecar.credentials import parse_authorization
from sidecar.errors import (
    MSG_INVALID,
    MSG_MISSING,
    MSG_SCHEME,
    InvalidToken,
    MissingCredentials,
    Unauthorized,
    WrongScheme,
)


@pytest.mark.parametrize("header", ["Bearer abc", "bearer abc", "BEARER abc", " Bearer  abc "])
def test_accepts_bearer_in_any_case(header: str) -> None:
    assert parse_authorization([header], 512) == "abc"


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ([], MissingCredentials),
        (["Bearer a", "Bearer a"], MissingCredentials),
        (["Bearer"], MissingCredentials),
        (["Bearer "], MissingCredentials),
        ([""], MissingCredentials),
        (["Bearer a b"], MissingCredentials),
        (["Bearer a\tb"], MissingCredentials),
        (["Bearer a\x00b"], MissingCredentials),
        (["Bearer a\x7fb"], MissingCredentials),
        (["Basic abc"], WrongScheme),
        (["Token abc"], WrongScheme),
        (["Bearer " + "x" * 513], InvalidToken),
    ],
)
def test_rejections(values: list[str], error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_authorization(values, 512)


def test_messages_are_difys_and_never_contain_the_token() -> None:
    secret = "s3cr3t-token"
    for values, msg in ((["Basic " + secret], MSG_SCHEME), (["Bearer a " + secret], MSG_MISSING),
                        (["Bearer " + secret * 100], MSG_INVALID)):
        with pytest.raises(Unauthorized) as exc:
            parse_authorization(values, 512)
        assert str(exc.value) == msg
        assert secret not in str(exc.value)


def test_length_limit_is_inclusive() -> None:
    assert parse_authorization(["Bearer " + "x" * 512], 512) == "x" * 512
