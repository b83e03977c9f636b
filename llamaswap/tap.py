# -*- test-case-name: tests.test_tap -*-
"""
The twistd entry point: options, and the service tree they build.

Config errors surface in L{Options.postOptions} as one-line C{UsageError}s, so
twistd prints them and exits before daemonizing (no pidfile is left behind).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

from llamaswap.config import DEFAULT_LISTEN, Config, ConfigError, load_config
from llamaswap.events import EventBus
from llamaswap.http import make_http


class Options(usage.Options):
    """C{twistd llamaswap} options."""

    synopsis = "--config PATH [--listen ENDPOINT]"
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration (required)."],
        [
            "listen",
            "l",
            DEFAULT_LISTEN,
            "Twisted server endpoint to listen on, e.g. tcp:8080:interface=0.0.0.0 "
            "or systemd:domain=INET:index=0 for socket activation.",
        ],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            self["parsed"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


class HTTPService(Service):
    """Listen on an endpoint; binding errors abort twistd's start-up."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Site) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        # Bind before privileges drop, and raise synchronously (port in use) so
        # twistd reports it and exits non-zero instead of running deaf.
        failures: list[Failure] = []
        self._endpoint.listen(self._factory).addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        self.log.info("llamaswap listening on {address}", address=address)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


class LlamaSwapService(MultiService):
    """
    The whole proxy. Stops in order: stop accepting HTTP, stop every model
    server (waits for each child to be reaped), then close pools and logs.
    """

    def __init__(self, config: Config, *, listen: str, reactor: Any) -> None:
        super().__init__()
        from llamaswap.logs import LogHub
        from llamaswap.resources import build_root
        from llamaswap.site import LlamaSwapSite
        from llamaswap.supervisor import Supervisor

        self.config = config
        self.events = EventBus()
        self.logs = LogHub(config, events=self.events)
        self.supervisor = Supervisor(config, reactor=reactor, events=self.events)
        self._http, self._pool = make_http(reactor)
        root = build_root(
            config,
            supervisor=self.supervisor,
            logs=self.logs,
            events=self.events,
            http=self._http,
            reactor=reactor,
        )
        # LlamaSwapSite: refuses oversized bodies before reading them, logs requests.
        site = LlamaSwapSite(
            root,
            max_body_size=config.max_body_size,
            log_requests=config.log_requests,
            events=self.events,
            reactor=reactor,
        )
        self.http = HTTPService(serverFromString(reactor, listen), site)
        # Start order: logs first (capture everything), then models, then HTTP.
        self.logs.setServiceParent(self)
        self.supervisor.setServiceParent(self)
        self.http.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)

        async def stop_in_order() -> None:
            await self.http.stopService()
            await maybeDeferred(self.supervisor.stopService)
            await self._pool.closeCachedConnections()
            await maybeDeferred(self.logs.stopService)

        return Deferred.fromCoroutine(stop_in_order())


def build_service(
    config: Config, *, reactor: Any, listen: str = DEFAULT_LISTEN
) -> LlamaSwapService:
    """Build (but do not start) the proxy service for C{config}."""
    for warning in config.warnings:
        Logger(namespace="llamaswap.config").warn("{warning}", warning=warning)
    return LlamaSwapService(config, listen=listen, reactor=reactor)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor  # late: twistd has installed its reactor

    return build_service(options["parsed"], reactor=reactor, listen=options["listen"])
