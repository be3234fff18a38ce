"""A small client for the RabbitMQ management HTTP API (topology, users, queue stats)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from broker_config.settings import Settings
from schemas.errors import BrokerUnavailable, TransportError


@dataclass(frozen=True, slots=True)
class ManagementClient:
    """Calls ``api_url`` (ending in ``/api/``) with HTTP basic auth.

    Examples
    --------
    >>> c = ManagementClient.from_urls("amqp://u:p@127.0.0.1:5672/", None)
    >>> c.api_url, c.vhost
    ('http://127.0.0.1:15672/api/', '/')
    """

    api_url: str
    user: str
    password: str
    vhost: str = "/"
    timeout: float = 10.0

    @classmethod
    def from_urls(cls, broker_url: str, api_url: str | None) -> ManagementClient:
        """Credentials and vhost from the (first) AMQP URL; API on its host, port 15672, if
        not given."""
        parts = urlsplit(broker_url.split(";")[0].strip())
        user = unquote(parts.username or "guest")
        password = unquote(parts.password or "guest")
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        if api_url is None:
            api_url = f"http://{parts.hostname or '127.0.0.1'}:15672/api/"
        if not api_url.endswith("/"):
            api_url += "/"
        if not api_url.endswith("api/"):
            api_url += "api/"
        return cls(api_url=api_url, user=user, password=password, vhost=vhost)

    @classmethod
    def from_settings(cls, settings: Settings, api_url: str | None = None) -> ManagementClient:
        """A client for ``settings.broker_url``'s credentials and ``settings.management_url``."""
        return cls.from_urls(settings.broker_url, api_url or settings.management_url)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One API call; returns the decoded JSON (or None); raises TransportError."""
        url = self.api_url + path
        if urlsplit(url).scheme not in ("http", "https"):
            raise TransportError(f"management URL {url!r} must be http(s)")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (scheme checked)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise TransportError(
                f"management API {method} {path} failed with HTTP {e.code}: {detail}; check "
                "the user's tags (administrator for setup, monitoring for status)"
            ) from None
        except OSError as e:
            raise BrokerUnavailable(
                f"cannot reach the RabbitMQ management API at {self.api_url} ({e}); enable it "
                "with `rabbitmq-plugins enable rabbitmq_management` or pass --api URL"
            ) from None
        return json.loads(raw) if raw else None

    def q(self, name: str) -> str:
        """A path segment (quoted, '/' included)."""
        return quote(name, safe="")

    def vq(self) -> str:
        """The quoted vhost path segment."""
        return self.q(self.vhost)
