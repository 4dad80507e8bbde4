"""fake_server.py -- the socket scaffolding of the tests' stand-ins for lunad.

A FakeServer listens on a Unix (or TCP) address, accepts connections on a thread and
serves each on a thread of its own with the subclass's _serve(conn). The stand-ins in
test_client_proto.py, test_lora_client.py and test_vae_client.py answer frames in their
own ways; only this part (and recv_exact) is common.
"""

import socket
import threading


class FakeServer:
    def __init__(self, address, family=socket.AF_UNIX, backlog=16):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(backlog)
        self.address = self.sock.getsockname()
        self.path = address if family == socket.AF_UNIX else None
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        raise NotImplementedError


def recv_exact(conn, n):
    """n bytes from 'conn', or None when the client closed or reset the connection first."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except OSError:  # the client went away (reset): the same as a close here
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
