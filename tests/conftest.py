"""Shared test setup: deterministic, single-threaded-friendly, and no network."""
import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests never download: any attempt to open a network connection fails loudly. Unix-domain sockets are
    local IPC (DataLoader workers pass tensors' file descriptors over them; a local Ray talks to itself), and
    Ray's tests start their own local instance, which connects to 127.0.0.1 only."""
    connect = socket.socket.connect

    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not use the network")

    def local_only(self, address, *args, **kwargs):
        if self.family == getattr(socket, "AF_UNIX", None):
            return connect(self, address, *args, **kwargs)
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny workloads: one torch thread is faster there and does not stall on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
