# -*- test-case-name: tests.test_scaleout -*-
"""
The HAProxy configuration of the front (HAProxy 2.6 or later: C{balance hash}).

One frontend reads the model a request names the way llamaswap does (JSON
body, multipart field, C{?model=}, C{/upstream/<model>/}, C{/v1/models/<id>})
and sends it to the backend of the hosts that serve it: a consistent hash on
the name, so a model stays on one host while that host is up and moves to
another one of its hosts when it goes down. Each backend checks its hosts'
C{/health}, and takes a host out at the first connection it refuses, so that
the retry of that request goes where the model will stay. Every
answer the front makes itself is llamaswap's OpenAI-shaped JSON error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from attrs import frozen

from llamaswap.errors import error_body
from llamaswap.scaleout.plan import Plan, Route
from llamaswap.web.tree import FORM_ROUTES, JSON_ROUTES, QUERY_ROUTES, VERSIONLESS_ROUTES

# HAProxy splits a line into 64 words at most: long lists go on several lines.
_WORDS_PER_LINE = 40
_MODEL = "@@model@@"  # where an error message names the model (a log-format expression)
_MODEL_EXPR = "%[var(txn.model),json(utf8s)]"
# What a full request buffer leaves for the body (headers, HAProxy's rewrite reserve): a
# body at least this long whose model could not be read was probably cut.
_BUFFER_OVERHEAD = 16384
# The multipart field "model" (its value up to the line's end); a quote is "." here, as
# the expression is already inside two levels of quotes.
_FORM_MODEL = r"name=.model.\r\n\r\n([^\r\n]*)\r\n"
ALL_HOSTS = "all_hosts"


@frozen
class FrontSettings:
    """
    How the front listens and waits.

    @ivar models_path: the absolute path of the union model list, which
        HAProxy reads when it starts.
    @ivar timeout: seconds a host may stay silent (a swap, then a long
        generation) and a client may be idle.
    @ivar buffer_size: C{tune.bufsize}: the largest request the front can
        read a model from (and retry on another host).
    @ivar check_interval: seconds between health checks of a host; two
        failed checks in a row take it out.
    @ivar user: run as this user and group (when started as root).
    @ivar api_keys: the hosts' C{apiKeys}; the front asks for one of them
        before it answers anything itself (as a host would).
    """

    models_path: str
    bind: str = "127.0.0.1:8080"
    timeout: float = 600.0
    buffer_size: int = 1 << 20
    check_interval: float = 1.0
    user: str | None = None
    api_keys: tuple[str, ...] = ()


def quote(text: str) -> str:
    """C{text} as one word of haproxy.cfg (single quotes: nothing inside is special)."""
    if "'" in text:
        raise ValueError(f"cannot write {text!r} into haproxy.cfg")
    return f"'{text}'"


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _error(status: int, message: str) -> str:
    """An C{lf-string} argument: llamaswap's error body, C{_MODEL} naming the model."""
    body = error_body(status, message).decode("utf-8")
    return quote(body.replace("%", "%%").replace(_MODEL, _MODEL_EXPR))


def _answer(status: int, message: str, condition: str, headers: str = "") -> str:
    return (
        f"    http-request return status {status} content-type application/json"
        f" lf-string {_error(status, message)}{headers} if {condition}"
    )


def _http_error(status: int, message: str) -> str:
    return f"    http-error status {status} content-type application/json lf-string " + _error(
        status, message
    )


def _lines(head: str, words: Sequence[str]) -> list[str]:
    """C{head word word ...}, on as many lines as HAProxy needs (same-named ACLs add up)."""
    return [
        f"{head} {' '.join(words[i : i + _WORDS_PER_LINE])}"
        for i in range(0, len(words), _WORDS_PER_LINE)
    ]


def render(plan: Plan, settings: FrontSettings) -> str:
    """The whole haproxy.cfg for C{plan}."""
    sections = [
        _header(plan),
        _global(settings),
        _defaults(settings),
        _frontend(plan, settings),
        _all_hosts(plan),
        *(_model_backend(plan, route) for route in plan.routes),
    ]
    return "\n".join("\n".join(section) + "\n" for section in sections)


def _header(plan: Plan) -> list[str]:
    hosts = " ".join(f"{h.name}={h.address}" for h in plan.hosts)
    lines = [
        "# The llamaswap front: written by `llamaswap haproxy-config` (docs/scale-out.md).",
        "# Run that command again when the hosts or their models change, rather than editing.",
        f"# Hosts: {hosts}",
    ]
    lines += [f"#   {r.backend}: {', '.join(h.name for h in r.hosts)}" for r in plan.routes]
    if plan.skipped:
        lines.append(f"# Left out (a quote or control character): {plan.skipped!r}")
    return lines


def _global(settings: FrontSettings) -> list[str]:
    lines = [
        "global",
        # journald takes the <N> prefix as the line's priority.
        "    log stdout format short local0 info",
        "    # The front reads a request's model from its body, which must fit in one buffer.",
        f"    tune.bufsize {settings.buffer_size}",
    ]
    if settings.user:
        lines += [f"    user {settings.user}", f"    group {settings.user}"]
    return lines


def _defaults(settings: FrontSettings) -> list[str]:
    wait = _ms(settings.timeout)
    every = _ms(settings.check_interval)
    return [
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        "    timeout connect 3s",
        "    # A request may wait for a model swap, then stream for minutes.",
        f"    timeout client {wait}",
        f"    timeout server {wait}",
        "    timeout http-request 60s",
        "    timeout http-keep-alive 30s",
        "    timeout queue 60s",
        "    timeout check 2s",
        "    # Send a token the moment it comes: without this HAProxy holds small chunks",
        "    # back to fill packets, and a stream's tokens arrive in pairs, 200 ms late.",
        "    option http-no-delay",
        "    # A request that could not reach a host, or that a host dropped before",
        "    # answering anything (a crash, a stop), goes to another host that serves",
        "    # the model: every retry is redispatched. Never once an answer has begun.",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "    # A new connection to the host for each request (clients keep theirs). A request",
        "    # that HAProxy sends on a kept-alive connection the host has just closed is",
        "    # answered by closing the client's connection (for a browser to retry), and",
        "    # API clients do not all retry; a dead host's refused connection is retried here.",
        "    option http-server-close",
        "    # Health: each backend checks its hosts. A connection a host refuses takes it",
        "    # out at once (observe), so that the retry goes where the model will stay.",
        "    option httpchk GET /health",
        "    http-check expect status 200",
        f"    default-server check inter {every} fastinter {_ms(settings.check_interval / 2)}"
        f" downinter {every} fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down",
        "    # HAProxy's own errors, as llamaswap writes them.",
        _http_error(400, "bad request (refused by the llamaswap front)"),
        _http_error(408, "timed out waiting for the request"),
        _http_error(500, "internal error in the llamaswap front"),
        _http_error(502, "bad gateway: the llamaswap host closed the connection"),
        _http_error(503, "no llamaswap host can serve this request"),
        _http_error(504, "gateway timeout: the llamaswap host did not answer in time"),
    ]


def _frontend(plan: Plan, settings: FrontSettings) -> list[str]:
    body_paths = [*JSON_ROUTES, *(f"/v/{p}" for p in VERSIONLESS_ROUTES)]
    cut_at = max(1, settings.buffer_size - _BUFFER_OVERHEAD)
    names = plan.names
    lines = [
        "frontend llamaswap",
        f"    bind {settings.bind}",
        "    option http-buffer-request",
        "    option forwardfor",
        "    # /health: 200 while at least one host is up.",
        "    monitor-uri /health",
        f"    monitor fail if {{ nbsrv({ALL_HOSTS}) lt 1 }}",
        "",
        *_lines("    acl body_route path", body_paths),
        *_lines("    acl form_route path", FORM_ROUTES),
        *_lines("    acl query_route path", QUERY_ROUTES),
        "    acl model_list path /v1/models /models",
        "    acl model_record path_beg /v1/models/ /models/",
        "    acl upstream path_beg /upstream/",
        "    acl multipart req.hdr(content-type) -m beg -i multipart/form-data",
        "    acl has_model var(txn.model) -m len gt 0",
        "    acl body_cut req.body_size,sub(txn.body_len) gt 0",
        f"    acl body_cut req.body_len ge {cut_at}",
        *_lines("    acl known_model var(txn.model) -m str", [quote(n) for n in names]),
        *(
            line
            for route in plan.routes
            for line in _lines(
                f"    acl to_{route.backend} var(txn.model) -m str", [quote(n) for n in route.names]
            )
        ),
        "",
        "    # The model, found where llamaswap looks for it.",
        "    http-request set-var(txn.body_len) req.body_len",
        "    http-request set-var(txn.model) req.body,json_query('$.model')"
        " if METH_POST body_route or METH_POST query_route or METH_POST form_route !multipart",
        "    http-request set-var(txn.model)"
        f' req.body,\'regsub("(?s)^.*?{_FORM_MODEL}.*$","\\1")\''
        f" if METH_POST form_route multipart {{ req.body -m reg {quote(_FORM_MODEL)} }}",
        "    http-request set-var(txn.model) urlp(model),url_dec(1) if METH_GET query_route",
        "    http-request set-var(txn.model) path,bytes(11),url_dec if { path_beg /v1/models/ }",
        "    http-request set-var(txn.model) path,bytes(8),url_dec if { path_beg /models/ }",
        "    # /upstream/<model>/...: ids may contain /, the longest one that fits wins.",
        *_upstream_rules(names),
        "    http-request set-var(txn.model) path,field(3,/),url_dec if upstream !has_model",
        "    # The hash key: the model's id, whatever name the request used.",
        "    http-request set-var(txn.key) var(txn.model)",
        *_alias_rules(plan.aliases),
        "",
        "    # What the front answers itself.",
        *_key_check(settings.api_keys),
        "    http-request return status 200 content-type application/json"
        f" file {quote(settings.models_path)} hdr Access-Control-Allow-Origin '*'"
        " if model_list METH_GET or model_list METH_HEAD",
        _answer(
            413,
            f"request body too large for the llamaswap front to read its model"
            f" (over {cut_at} bytes): regenerate it with a larger --buffer-size",
            "METH_POST !has_model body_cut",
        ),
        _answer(404, f"model not found: {_MODEL}", "has_model !known_model"),
        _answer(
            404,
            "not found: the llamaswap front serves the model API;"
            " ask a host itself for its other pages",
            "!METH_OPTIONS !body_route !form_route !query_route !upstream !model_record",
        ),
        "",
        *(f"    use_backend {r.backend} if to_{r.backend}" for r in plan.routes),
        "    # No model named (the host answers: 400, 405, CORS preflight...).",
        f"    default_backend {ALL_HOSTS}",
    ]
    return lines


def _upstream_rules(names: Iterable[str]) -> list[str]:
    rules = []
    for name in sorted(names, key=lambda n: (-len(n.encode("utf-8")), n)):
        length = len(name.encode("utf-8"))
        rules.append(
            f"    http-request set-var(txn.model) path,url_dec,bytes(10,{length})"
            f" if !has_model {{ path,url_dec -m beg {quote('/upstream/' + name + '/')} }}"
            f" or !has_model {{ path,url_dec -m str {quote('/upstream/' + name)} }}"
        )
    return rules


def _alias_rules(aliases: dict[str, str]) -> list[str]:
    by_model: dict[str, list[str]] = {}
    for alias, model in sorted(aliases.items()):
        by_model.setdefault(model, []).append(quote(alias))
    return [
        f"    http-request set-var-fmt(txn.key) {quote(model.replace('%', '%%'))}"
        f" if {{ var(txn.model) -m str {' '.join(names[i : i + _WORDS_PER_LINE])} }}"
        for model, names in sorted(by_model.items())
        for i in range(0, len(names), _WORDS_PER_LINE)
    ]


def _key_check(keys: Sequence[str]) -> list[str]:
    if not keys:
        return []
    quoted = [quote(k) for k in keys]
    return [
        *_lines("    acl has_key req.hdr(x-api-key) -m str", quoted),
        *_lines(
            "    acl has_key req.hdr(authorization) -m str", [quote(f"Bearer {k}") for k in keys]
        ),
        _answer(
            401,
            "unauthorized: invalid or missing API key",
            "!METH_OPTIONS !has_key",
            " hdr WWW-Authenticate 'Basic realm=\"llama-swap\"'",
        ),
    ]


def _servers(plan: Plan, route: Route | None) -> list[str]:
    hosts = plan.hosts if route is None else route.hosts
    return [f"    server {h.name} {h.address} id {plan.ids[h.name]}" for h in hosts]


def _all_hosts(plan: Plan) -> list[str]:
    return [
        f"backend {ALL_HOSTS}",
        "    # Every host: for the requests that name no model, and /health.",
        "    balance roundrobin",
        "    http-response set-header X-Llamaswap-Host %[srv_name]",
        _http_error(503, "no llamaswap host is up"),
        *_servers(plan, None),
    ]


def _model_backend(plan: Plan, route: Route) -> list[str]:
    hosts = ", ".join(h.name for h in route.hosts)
    names = ", ".join(route.names[:8]) + (
        f" and {len(route.names) - 8} more" if len(route.names) > 8 else ""
    )
    return [
        f"backend {route.backend}",
        f"    # Served by {hosts}: {names}",
        "    balance hash var(txn.key)",
        "    hash-type consistent",
        "    http-response set-header X-Llamaswap-Host %[srv_name]",
        _http_error(503, f"no llamaswap host that serves model {_MODEL} is up ({hosts})"),
        *_servers(plan, route),
    ]
