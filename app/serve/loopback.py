"""Keep Ray Serve's own servers on the loopback interface when the Ray node is a loopback one.

Ray Serve 2.60 starts, in every replica, an inter-deployment gRPC server bound to `[::]:0` (every
interface), whatever the node's address. On a node whose address is 127.0.0.1 (the local instance
`brand-image-serve` starts, RAY_BIND_HOST=127.0.0.1) its callers reach it at that address, so it is
bound to 127.0.0.1 instead. Elsewhere (a cluster, `serve run` on Ray's defaults) nothing changes.
"""

from __future__ import annotations

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def keep_serve_grpc_on_loopback() -> bool:
    """Call in a replica's constructor (Serve starts the server after it). True when it applied."""
    import ray
    from ray.serve._private import replica as serve_replica

    if ray.util.get_node_ip_address() not in LOOPBACK:
        return False
    original = serve_replica.add_port_to_grpc_server
    if getattr(original, "loopback", False):
        return True

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return original(server, address)

    add_port.loopback = True
    serve_replica.add_port_to_grpc_server = add_port
    return True
