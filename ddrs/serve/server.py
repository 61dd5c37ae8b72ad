"""`ddrs serve` from its run specification: the model or experts, the memory, the service, the
app, and uvicorn with the server's own timeouts.

uvicorn bounds the wait between keep-alive requests but not the time a client takes to send a
request's headers, so a client that trickles them (slowloris) would hold a connection for
ever: `HeaderTimeout` closes it after `--header-timeout` seconds with a 408. The body's
deadline (`--body-timeout`) is the app's (app.py).
"""

from __future__ import annotations

import json
import logging
import socket

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ddrs.classifier import DataDependentSmoothClassifier
from ddrs.data import DatasetInfo, ImageOptions, dataset_info
from ddrs.errors import InputError
from ddrs.launch import device_for
from ddrs.memory import CertificationMemory
from ddrs.memory.store import shown_location
from ddrs.models.identity import memory_fingerprint
from ddrs.runs.source import load_router, recorded_image_options
from ddrs.serve.app import create_app
from ddrs.serve.security import read_token, url_host
from ddrs.serve.service import CertificationService
from ddrs.serve.spec import LOOPBACK_NAMES as LOOPBACK
from ddrs.serve.spec import ServeRun


class HeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's headers."""

    header_timeout = 10.0
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # waiting for the next request's headers
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        if self.transport.is_closing():
            return
        if self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:
            body = json.dumps(
                {"error": f"the request's headers did not arrive within {self.header_timeout:g} s"}
            ).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: "
                b"application/json\r\nConnection: close\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
        self.transport.close()


def header_timeout(seconds: float) -> type[HeaderTimeout]:
    return type("HeaderTimeout", (HeaderTimeout,), {"header_timeout": float(seconds)})


def check_port_free(host: str, port: int) -> None:
    """A one-line error, before anything is created, when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise InputError(
                f"cannot listen on {url_host(host)}:{port} ({error.strerror}); "
                "pass another --port, or stop what uses it"
            ) from None


def _inputs(run: ServeRun) -> DatasetInfo:
    if run.dataset:
        options = ImageOptions(*recorded_image_options(run.first_source, None, None))
        return dataset_info(
            run.dataset, run.data_root, options if run.dataset == "imagefolder" else None
        )
    channels = run.input_shape[0]
    return DatasetInfo(
        "custom", run.num_classes, tuple(run.input_shape), (0.0,) * channels, (1.0,) * channels
    )


def _log_lines(level: str) -> None:
    """The service's own log lines (ddrs.serve) on stderr, at uvicorn's --log-level."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
    logger = logging.getLogger("ddrs")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())


def serve(run: ServeRun) -> None:
    """Load, check, and serve until stopped (SIGTERM drains the queries in flight)."""
    token = read_token(run.token_file) if run.token_file else None
    check_port_free(run.host, run.port)
    info = _inputs(run)
    device = device_for(run.device)
    experts = run.load_for(info.num_classes, info.input_shape, info.name, device)
    fingerprint = memory_fingerprint(experts, info.name, info.input_shape)
    router = load_router(run.router, experts, device) if run.router else None

    def make_classifier():
        memory = None
        if run.memory is not None:
            memory = CertificationMemory(run.memory, fingerprint, info.input_shape, norm=run.norm)
        return DataDependentSmoothClassifier(
            experts,
            info.num_classes,
            memory,
            run.noise_level,
            n0=run.n0,
            n=run.n,
            alpha=run.alpha,
            batch=run.batch,
            seed=run.seed,
            selector=run.selector,
            search=run.options,
            router=router,
            router_n=run.router_n,
            router_share=run.router_share,
            route_rule=run.route_rule,
            cascade=run.cascade,
            amp=run.amp,
            compile=run.compile,
            radius=run.radius,
            family=run.family,
        )

    if run.memory is not None:  # a memory of another model or a corrupt one: say so now
        make_classifier().memory.close()
    memory = shown_location(run.memory) if run.memory else "none (stateless)"  # no password
    describe = {
        "model": fingerprint[:16],
        "dataset": info.name,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
        "sigma": run.sigma,
        "sigma0": run.sigma0,
        "search": run.selector,
        "n0": run.n0,
        "n": run.n,
        "alpha": run.alpha,
        "memory": memory,
        "radius": run.radius,
        "norm": run.norm,
        "noise": run.noise,
    }
    if not experts.is_model:
        describe.update(
            experts=experts.describe(),
            route=(
                f"router (sigma_r {router.sigma:g})"
                if router
                else f"cascade (p0 {run.cascade:g})"
                if run.cascade is not None
                else f"selector ({run.route_rule})"
            ),
        )
    describe = {key: value for key, value in describe.items() if value is not None}
    service = CertificationService(
        make_classifier, info, max_batch=run.max_batch, max_wait=run.max_wait, describe=describe
    )
    app = create_app(
        service,
        token=token,
        max_body_bytes=run.max_body_bytes,
        allowed_hosts=run.allowed_hosts,
        max_pixels=run.max_pixels,
        metrics_public=run.metrics_public,
        body_timeout=run.body_timeout,
    )
    auth = "token required" if token else "no token"
    if token is None and run.host not in LOOPBACK:
        print(
            f"warning: listening on {run.host} without --token-file: anyone who can reach "
            "it can query the model and grow the memory",
            flush=True,
        )
    if run.allowed_host is None and run.host not in LOOPBACK:
        print(
            f"note: requests are answered for the Host names {', '.join(run.allowed_hosts)}; "
            "give --allowed-host NAME for the name clients use",
            flush=True,
        )
    print(
        f"ddrs serve: http://{url_host(run.host)}:{run.port}/  memory {memory}  {auth}", flush=True
    )
    _log_lines(run.log_level)
    uvicorn.run(
        app,
        host=run.host,
        port=run.port,
        log_level=run.log_level,
        timeout_graceful_shutdown=run.drain_seconds,
        http=header_timeout(run.header_timeout),
    )
