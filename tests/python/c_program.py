"""c_program.py -- build a test's C program against luna's client library (libluna.a or libluna.so).

    exe = build_c_program(src, tmp_path / "prog", "static")   # or "shared"

Skips the test when there is no C compiler or no library in $LUNA_BUILD. The program
sees only include/; the static library needs -lcjson -lnettle -lm beside it. Under the
SAN=1 build (the library references the sanitizers) the program is built with them too.
A failed build fails the test with the compiler's output.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def build_dir():
    b = Path(os.environ.get("LUNA_BUILD", "build"))
    return b if b.is_absolute() else REPO / b


def build_c_program(src, exe, kind, extra_flags=()):
    cc = shutil.which("cc")
    lib = build_dir() / ("libluna.a" if kind == "static" else "libluna.so")
    if not cc or not lib.exists():
        pytest.skip("no C compiler or no %s" % lib.name)
    flags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(REPO / "include")] + list(extra_flags)
    undef = subprocess.run(["nm", "-u", str(lib)], stdout=subprocess.PIPE, text=True).stdout
    if "__asan_" in undef:  # the SAN=1 build: the program needs the sanitizer runtimes too
        flags += ["-fsanitize=address,undefined"]
    if kind == "static":
        cmd = [cc] + flags + [str(src), str(lib), "-lcjson", "-lnettle", "-lm", "-o", str(exe)]
    else:
        cmd = [cc] + flags + [str(src), "-L", str(lib.parent), "-lluna", "-Wl,-rpath," + str(lib.parent),
                              "-o", str(exe)]
    b = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert b.returncode == 0, b.stdout
    return exe
