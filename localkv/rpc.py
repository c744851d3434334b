"""llama.cpp's RPC backend: a model's layers on other machines.

`localkv rpc-server --port 50052` serves this machine's CPU to others (ggml's own RPC server, in this process);
`--rpc HOST:PORT[,HOST:PORT...]` (as llama.cpp spells it) adds those servers as devices before a model loads, and
llama.cpp puts the offloaded layers (`--gpu-layers`, all by default) on them. The compressed cache then lives,
attends and compacts there like on a GPU; only indices, statistics and masks cross the wire.
"""
from __future__ import annotations

import ctypes
import functools
import re
import socket
from pathlib import Path

from .errors import LocalkvError

GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU = 0, 1
_ENDPOINT = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


def _lib_dir() -> Path:
    from .capi import llama_cpp as ll
    return Path(ll._lib._name).parent


@functools.cache
def _ggml() -> ctypes.CDLL:
    """libggml (the backend registry), the instance libllama loaded: by its soname, or a second copy with a registry
    of its own would be mapped."""
    lib = ctypes.CDLL(str(_lib_dir() / "libggml.so.0"))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_register.restype = None
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_name.restype = ctypes.c_char_p
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    return lib


@functools.cache
def _rpc() -> ctypes.CDLL:
    path = _lib_dir() / "libggml-rpc.so.0"
    if not path.exists():
        raise LocalkvError("this llama_cpp was built without the RPC backend: run ./install.sh again")
    lib = ctypes.CDLL(str(path))
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    lib.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                                  ctypes.POINTER(ctypes.c_void_p)]
    lib.ggml_backend_rpc_start_server.restype = None
    return lib


def gpu_devices(local: bool = False) -> list[str]:
    """The names of this process's registered GPU devices, RPC ones left out when `local`
    (llama_supports_gpu_offload is true whenever the RPC backend is built, GPU or not)."""
    g = _ggml()
    devs = [g.ggml_backend_dev_get(i) for i in range(g.ggml_backend_dev_count())]
    return [g.ggml_backend_dev_name(d).decode() for d in devs if g.ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_GPU
            and not (local and g.ggml_backend_reg_name(g.ggml_backend_dev_backend_reg(d)) == b"RPC")]


def parse_endpoints(spec: str) -> list[str]:
    """'HOST:PORT[,HOST:PORT...]' -> endpoints; a one-line error for anything else."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        m = _ENDPOINT.match(part)
        if not m or not 0 < int(m["port"]) < 65536:
            raise LocalkvError(f"--rpc: '{part}' is not HOST:PORT (for example 192.168.1.7:50052)")
        out.append(part)
    if not out:
        raise LocalkvError("--rpc: no server given")
    return out


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise LocalkvError(f"--rpc: cannot reach the RPC server at {endpoint} ({e.strerror or e}); is `localkv "
                           "rpc-server` running there?") from None


def devices(endpoints: list[str]) -> list[int]:
    """The devices of these RPC servers, for a model to load onto (llama_model_params.devices). They are not
    registered with ggml: a model loaded later in the same process without them does not reach for them."""
    out = []
    for ep in endpoints:
        _check_reachable(ep)  # ggml aborts the process on a server it cannot reach
        reg = _rpc().ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise LocalkvError(f"--rpc: the RPC server at {ep} offers no device")
        out += [_ggml().ggml_backend_reg_dev_get(reg, d) for d in range(_ggml().ggml_backend_reg_dev_count(reg))]
    return out


def check_port(host: str, port: int) -> None:
    """A one-line error unless this process can listen on host:port (ggml only prints that it could not)."""
    try:
        with socket.socket() as probe:
            probe.bind((host, port))
    except OSError as e:
        raise LocalkvError(f"rpc-server: cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(host: str, port: int, threads: int) -> None:
    """Serve this machine's CPU over ggml's RPC protocol until the process is stopped (blocks)."""
    check_port(host, port)
    cpu = _ggml().ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    devices = (ctypes.c_void_p * 1)(cpu)
    _rpc().ggml_backend_rpc_start_server(f"{host}:{port}".encode(), None, threads, 1, devices)
    raise LocalkvError(f"rpc-server: the server on {host}:{port} stopped")
