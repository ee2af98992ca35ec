"""The objects one sidecar is made of, kept on the Application under one typed key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from sidecar.auth import Authenticator
from sidecar.invalidation import Invalidator
from sidecar.last_used import LastUsedQueue
from sidecar.metrics import Metrics
from sidecar.proxy import Forwarder
from sidecar.ratelimit import RateLimiter
from sidecar.rediscache import RedisCache
from sidecar.routing import Router
from sidecar.settings import Settings
from sidecar.store import PostgresTokenStore
from sidecar.trust import peer_trusted


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    router: Router
    store: PostgresTokenStore
    redis: RedisCache | None
    authenticator: Authenticator
    forwarder: Forwarder | None
    usage: LastUsedQueue
    invalidator: Invalidator
    limiter: RateLimiter

    def is_trusted(self, peer: str | None) -> bool:
        return peer_trusted(peer, self.settings.trusted_proxies)


SERVICES = web.AppKey("sidecar.services", Services)



# The ops Application keeps a reference to the main one, whose services it reports on.
MAIN_APP = web.AppKey("sidecar.main_app", web.Application)


def ops_services(request: web.Request) -> Services:
    return request.app[MAIN_APP][SERVICES]
