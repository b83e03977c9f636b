# -*- test-case-name: tests.test_tap -*-
"""
The twistd entry point: options, and the service tree they build.

Config errors surface in L{Options.postOptions} as one-line C{UsageError}s, so
twistd prints them and exits before daemonizing (no pidfile is left behind).
"""

from __future__ import annotations

import gc
import re
import sys
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService, Service
from twisted.copyright import version as twisted_version
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

import llamaswap
from llamaswap.config import DEFAULT_LISTEN, Config, ConfigError, load_config
from llamaswap.events import EventBus
from llamaswap.http import make_http
from llamaswap.lifecycle import signals
from llamaswap.lifecycle.shutdown import Drain
from llamaswap.lifecycle.watch import ConfigWatcher
from llamaswap.listen import (
    ListenError,
    bad_endpoint,
    cannot_listen,
    check_free,
    listening_line,
    translate,
)
from llamaswap.preflight import PathError, check_twistd_paths

if TYPE_CHECKING:
    from llamaswap.web.tree import Root, WebParts

_reload_log = Logger(namespace="llamaswap.reload")


class Options(usage.Options):
    """C{twistd llamaswap} options."""

    synopsis = "--config PATH [--listen ENDPOINT]"
    longdesc = ""  # not the running script's docstring, usage.Options' fallback
    optFlags = [
        ["watch-config", "w", "Reload the config whenever its file changes (also: SIGHUP)."]
    ]
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration (required)."],
        [
            "listen",
            "l",
            DEFAULT_LISTEN,
            "Where to listen: a Twisted endpoint, e.g. tcp:8080:interface=0.0.0.0 or "
            "systemd:domain=INET:index=0 for socket activation, or host:port as in "
            "llama-swap (:8080 is every interface).",
        ],
    ]

    def opt_version(self) -> None:
        """Display llamaswap's and Twisted's versions and exit."""
        sys.stdout.write(f"llamaswap {llamaswap.__version__} (Twisted {twisted_version})\n")
        sys.exit(0)

    def postOptions(self) -> None:
        if not self["config"]:
            raise ConfigUsageError(
                "--config is required, e.g. --config config.example.yaml (--help lists the options)"
            )
        try:
            self["parsed"] = load_config(self["config"])
        except ConfigError as e:
            raise ConfigUsageError(str(e)) from e
        try:
            # llama-swap's host:port forms become the endpoint string they mean.
            self["endpoint"] = translate(self["listen"])
        except ListenError as e:
            raise ConfigUsageError(str(e)) from e


class ConfigUsageError(SystemExit):
    """
    A bad configuration or start-up option, reported as one line on stderr with
    exit status 1.

    twistd answers a C{UsageError} with its whole option summary before the
    message, burying the one line that matters; a C{SystemExit} carrying the
    message is printed alone, still before any daemonizing or pidfile.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"llamaswap: {message}")
        self.message = message


async def _await_maybe(result: object) -> None:
    """Await C{result} if it is a Deferred (Twisted APIs return one or None)."""
    if isinstance(result, Deferred):
        await result


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
            error = failures[0].value
            if isinstance(error, CannotListenError):
                # Taken since makeService checked it: short, for a daemon's 100-byte report.
                short = cannot_listen(error.interface, error.port, error.socketError, hint=False)
                raise ListenError(short) from error
            failures[0].raiseException()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()  # type: ignore[no-untyped-call]

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        self.log.info(
            "llamaswap listening on {where}", where=listening_line(address), address=address
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return Deferred.fromCoroutine(_await_maybe(port.stopListening()))


class LlamaSwapService(MultiService):
    """
    The whole proxy. Stops in order: stop accepting HTTP, let the answers in
    flight finish (up to C{shutdownTimeout}: L{Drain}), stop every model server
    (waits for each child to be reaped), then close pools and logs.

    C{config_path}: the file L{reload_config} reads again (SIGHUP, the reload
    API, C{--watch-config} with C{watch}).
    """

    def __init__(
        self,
        config: Config,
        *,
        listen: str,
        reactor: Any,
        config_path: str | None = None,
        watch: bool = False,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        from llamaswap.logs import LogHub
        from llamaswap.supervisor import Supervisor
        from llamaswap.web.site import LlamaSwapSite

        self.config = config
        self.config_path = config_path
        # The name we listen on (--listen tcp:8080:interface=llm.lan) is one we answer to.
        interface = re.search(r"interface=([^:]+)", listen)
        self._listen_hosts = () if interface is None else (interface.group(1).lower(),)
        self._reactor = reactor
        self._drain: Drain | None = None
        self._hurried = False
        self._watcher = None
        if watch and config_path is not None:
            self._watcher = ConfigWatcher(config_path, reactor, self._watched)
        self.events = EventBus()
        self.logs = LogHub(config, events=self.events, reactor=reactor)
        self.supervisor = Supervisor(config, reactor=reactor, events=self.events)
        # Keep-alive for what reuses connections (the default), one connection
        # per request for the rest (docs/llama-server.md).
        self._http, self._pool = make_http(reactor)
        fresh_http, self._fresh_pool = make_http(reactor, persistent=False)
        self._fresh_http = fresh_http
        root = self._root_for(config, None)
        # LlamaSwapSite: refuses oversized bodies before reading them, logs requests.
        self.site = site = LlamaSwapSite(
            root, max_body_size=config.max_body_size, events=self.events, reactor=reactor
        )
        site.configure(config)
        self.http = HTTPService(_endpoint(reactor, listen), site)
        # Start order: logs first (capture everything), then models, then HTTP.
        for child in (self.logs, self.supervisor, self.http):
            child.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _root_for(self, config: Config, parts: WebParts | None) -> Root:
        """The resource tree for C{config}; over C{parts} (the last tree's) after a reload."""
        from llamaswap.web.tree import build_root

        return build_root(
            config,
            supervisor=self.supervisor,
            logs=self.logs,
            events=self.events,
            http=self._http,
            fresh_http=self._fresh_http,
            reactor=self._reactor,
            parts=parts,
            reload=self.reload_config,
            hosts=self._listen_hosts,
        )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._watcher is not None:
            self._watcher.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._watcher is not None:
            self._watcher.stop()
        drain = self._drain = Drain(
            self.site, self.supervisor, self._reactor, self.config.shutdown_timeout
        )
        if self._hurried:
            drain.hurry()

        async def stop_in_order() -> None:
            await self.http.stopService()
            await drain.run()
            stopping = self.supervisor.stopService()
            if self._hurried:
                self.supervisor.hurry()
            await _await_maybe(stopping)
            for pool in (self._pool, self._fresh_pool):
                await _await_maybe(pool.closeCachedConnections())  # type: ignore[no-untyped-call]
            self.logs.stopService()

        return Deferred.fromCoroutine(stop_in_order())

    def hurry(self) -> None:
        """Stop at once (a second signal): cut what runs, kill the model servers."""
        self._hurried = True
        if self._drain is not None:
            self._drain.hurry()
        self.supervisor.hurry()

    # --- reloading the config -------------------------------------------------

    def reload_config(self, source: str) -> dict[str, Any]:
        """
        Read the config file again and switch to it (docs/deployment.md):
        validated whole first; then the supervisor applies it model by model
        and a new resource tree (over the same counters and feeds) takes the
        next requests. C{source} says who asked (C{SIGHUP}, C{api}, C{watch}).

        @return: what changed, for the reload API.
        @raise ConfigError: the file is invalid, or changes what only a
            restart can; nothing changed then. Logged and published either way.
        """
        when = round(self._reactor.seconds(), 3)
        try:
            if self.config_path is None:
                raise ConfigError("no config file to reload (the config was not read from a file)")
            # Running models keep their ${PORT}: adding a model moves no other.
            ports = {m.id: m.port for m in self.config.models.values() if m.port is not None}
            new = load_config(self.config_path, kept_ports=ports)
            self.supervisor.check_reload(new)
        except ConfigError as e:
            _reload_log.error(
                "config reload ({source}) failed; the running config is kept: {error}",
                source=source,
                error=str(e),
            )
            self.events.publish(
                "config", {"ok": False, "source": source, "time": when, "error": str(e)}
            )
            raise
        for warning in new.warnings:
            Logger(namespace="llamaswap.config").warn("{warning}", warning=warning)
        diff = self.supervisor.reload(new)
        self.config = new
        self.logs.reconfigure(new)
        self.site.configure(new)
        self.site.resource = self._root_for(new, self.site.resource.parts)
        changes = diff.summary()
        self.events.publish(
            "config", {"ok": True, "source": source, "time": when, "changes": changes}
        )
        return {"reloaded": True, "source": source, "changes": changes}

    def reload_quietly(self, source: str) -> None:
        """A reload nobody answers to (SIGHUP, the watcher): its failure is logged only."""
        try:
            self.reload_config(source)
        except ConfigError:
            pass

    def _watched(self) -> None:
        self.reload_quietly("watch")


def _endpoint(reactor: Any, listen: str) -> IStreamServerEndpoint:
    """Parse C{--listen}; a bad string (or no socket from systemd) is one line, not a traceback."""
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, listen)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigUsageError(bad_endpoint(listen, e)) from e
    return endpoint


def build_service(
    config: Config,
    *,
    reactor: Any,
    listen: str = DEFAULT_LISTEN,
    config_path: str | None = None,
    watch: bool = False,
) -> LlamaSwapService:
    """Build (but do not start) the proxy service for C{config} (read from C{config_path})."""
    for warning in config.warnings:
        Logger(namespace="llamaswap.config").warn("{warning}", warning=warning)
    return LlamaSwapService(
        config, listen=listen, reactor=reactor, config_path=config_path, watch=watch
    )


def _freeze_startup_heap() -> None:
    """
    Move the start-up objects (imports, config, resource tree: ~55,000) out of
    the cyclic garbage collector's reach. Otherwise each full collection walks
    them all: a 20 ms pause every few thousand requests, in the middle of
    whatever streams (docs/performance.md). Cyclic garbage made later is
    collected as before.
    """
    gc.collect()
    gc.freeze()


def makeService(options: Options) -> IService:
    """
    Build the service for twistd, after checking what twistd would otherwise fail
    on later with a traceback, or (as a daemon) with a report cut at 100 bytes:
    its log file, pidfile and run folder, and the address to listen on.
    """
    from twisted.internet import reactor  # late: twistd has installed its reactor

    log = Logger(namespace="llamaswap.tap")
    listen: str = options["endpoint"]
    try:
        if options.parent is not None:  # twistd's own options
            check_twistd_paths(options.parent)
        check_free(_endpoint(reactor, listen))
    except (PathError, ListenError) as e:
        raise ConfigUsageError(str(e)) from e
    if listen != options["listen"]:
        log.info("--listen {given} is {endpoint}", given=options["listen"], endpoint=listen)
    try:
        service = build_service(
            options["parsed"],
            reactor=reactor,
            listen=listen,
            config_path=options["config"],
            watch=bool(options["watch-config"]),
        )
    except ConfigError as e:  # what only start-up can check (memory budgets from nvidia-smi)
        raise ConfigUsageError(str(e)) from e
    reactor.callWhenRunning(signals.install, reactor, service.reload_quietly, service.hurry)
    # Once running (services started): only twistd's process, never a test's.
    reactor.callWhenRunning(reactor.callLater, 0, _freeze_startup_heap)
    return service
