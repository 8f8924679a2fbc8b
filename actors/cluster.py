"""Connecting to Ray, and asking the cluster what it has (CPUs, GPUs, toolchain).

`connect` fails fast with one line when an address has nothing behind it: Ray's own client waits 30 s (ray://)
or loops on the GCS for a minute (host:port) before giving up, so a probe goes first. A TCP connect is not
enough: any service on that port accepts it (a web server, ssh), and Ray then waits on it for minutes. Both Ray
endpoints (the GCS at host:port, the client server at ray://host:10001) are gRPC, that is HTTP/2: the probe
sends HTTP/2's client preface and requires the server's first frame to be SETTINGS, as every HTTP/2 server's is.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import ray

from fact_ray.errors import ServiceUnreachable, first_line
from fact_ray.toolchain import Host

PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Connection:
    address: str  # "" for a local Ray started here
    started_here: bool  # this process called ray.init and must shut it down
    reused: bool = False  # Ray was already initialised in this process (a test, or an embedding program)


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a ray:// or host:port address; None for "auto"/"local" (nothing to probe)."""
    a = address.strip()
    if a in ("auto", "local"):
        return None
    a = a.removeprefix("ray://")
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit():
        raise ServiceUnreachable(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    return host.strip("[]") or "127.0.0.1", int(port)


# HTTP/2 client connection preface, then an empty SETTINGS frame (length 0, type 4, flags 0, stream 0).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    hp = split_address(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        head = b""
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ServiceUnreachable(f"Ray cluster at {address} is not reachable ({reason})") from None
    if len(head) < 9 or head[3] != 4:
        seen = "no answer" if not head else f"it answered {head[:9]!r}"
        raise ServiceUnreachable(f"{address} is not a Ray cluster: something listens there but does not speak "
                                 f"gRPC ({seen}); check --address (ray://head:10001 or head:6379)")


def connect(address: str, *, num_cpus: int | None = None) -> Connection:
    """Join the cluster at `address`, or start a local Ray ("" ). An initialised Ray in this process is reused
    when no address is asked for."""
    if ray.is_initialized():
        if address:
            raise ServiceUnreachable(f"Ray is already initialised in this process; cannot also connect to {address}")
        return Connection("", started_here=False, reused=True)
    if address:
        probe(address)
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, TimeoutError, RuntimeError, ray.exceptions.RayError) as e:
            raise ServiceUnreachable(f"Ray cluster at {address}: cannot connect ({first_line(e)})") from None
        return Connection(address, started_here=True)
    ray.init(include_dashboard=False, num_cpus=num_cpus, logging_level="WARNING")
    return Connection("", started_here=True)


def disconnect(conn: Connection) -> None:
    if conn.started_here and ray.is_initialized():
        ray.shutdown()


def gpu_count() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cpu_count() -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def driver_node_affinity() -> Any:
    """A scheduling strategy that keeps an actor on the driver's node (its local paths are the user's)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


@ray.remote(num_cpus=1, max_retries=2)
def toolchain_info(nvcc: str) -> tuple[Host, str]:
    """A compile node's toolchain (nvcc, CUTLASS, torch, ...) and its Ray version. Raises NotAvailable without
    nvcc."""
    from fact_ray.toolchain import detect

    return detect(nvcc), ray.__version__
