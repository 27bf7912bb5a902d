"""Put this folder on PYTHONPATH to forbid network access: any outbound connection raises.

Used by the tests that run the pipeline "with sockets blocked" (no network at run time).
Unix-domain sockets stay allowed (multiprocessing and the like use them locally).
"""
import socket

_connect = socket.socket.connect


class NetworkBlocked(OSError):
    pass


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise NetworkBlocked(f"network access attempted: {address!r}")
    return _connect(self, address)


def _no_dns(*args, **kwargs):
    raise NetworkBlocked(f"DNS lookup attempted: {args[:1]!r}")


socket.socket.connect = _guarded_connect
socket.getaddrinfo = _no_dns
socket.gethostbyname = _no_dns
