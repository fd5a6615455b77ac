"""Small real images for the service tests, pushed to the test registry."""

from __future__ import annotations

import os
import re
import secrets
from collections import Counter

from tests.support.imagebuilder import Layer, PushedImage, TarEntry, push_image


def push_small_image(registry: object, repo: str | None = None, *, layers: int = 6,
                     layer_bytes: int = 64 << 10) -> PushedImage:
    """An image of ``layers`` layers with unique random content (never in any cache yet)."""
    repo = repo or f"svc/small-{secrets.token_hex(4)}"
    built = []
    for i in range(layers):
        entries = [
            TarEntry(f"layer{i}", kind="dir"),
            TarEntry(f"layer{i}/data.bin", data=os.urandom(layer_bytes)),
            TarEntry(f"layer{i}/hello.txt", data=f"hello from layer {i}\n".encode()),
        ]
        if i == 0:
            entries += [TarEntry("etc", kind="dir"),
                        TarEntry("etc/os-release", data=b"ID=rootfs-export-test\n"),
                        TarEntry("bin", kind="dir"),
                        TarEntry("bin/sh", data=b"#!/bin/true\n", mode=0o755)]
        built.append(Layer.from_entries(entries))
    return push_image(registry, repo, "v1", built,  # type: ignore[arg-type]
                      config={"Entrypoint": ["/bin/sh"], "Env": ["PATH=/bin"],
                              "WorkingDir": "/"})


_BLOB_GET = re.compile(r'"GET /v2/(?P<repo>[^ ]+)/blobs/(?P<digest>sha256:[0-9a-f]{64}) ')


def blob_gets(registry_log: str) -> Counter[str]:
    """How many times each blob was downloaded (GET, not HEAD), from the registry's access log."""
    return Counter(m.group("digest") for m in _BLOB_GET.finditer(registry_log))
