"""Layer fetching: one pass over the network into a verified, indexed cache entry.

For each layer, the bytes stream once: sha256 + temp file in the downloading thread, and right
behind it, reading the temp file as it grows, decompressor (compression sniffed from magic
bytes) + tar indexer (diff_id, limits) in a second thread, so the network never waits for
inflation and both cores work. Only when the blob digest and the diff_id both check out is
the temp file renamed into the cache and its index stored beside it. :func:`fetch_layers`
runs several layers on a bounded thread pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from worker.cache.blobs import BlobCache
from worker.cache.decompress import (
    CHUNK,
    Decompressor,
    media_type_compression,
    read_file_chunks,
    sniff_compression,
)
from worker.cache.index import (
    IndexEntry,
    IndexLimits,
    LayerIndex,
    TarIndex,
    index_tar_stream,
)
from worker.errors import Canceled, CorruptLayer, DigestMismatch, LayerError, RootfsExportError
from worker.progress import (
    LayerProgress,
    LayerState,
    Phase,
    ProgressCallback,
    ProgressEvent,
    no_progress,
)
from worker.pull.credentials import Credentials, CredentialSource
from worker.pull.manifest import Descriptor, ResolvedImage
from worker.pull.reference import Reference, parse_reference
from worker.pull.registry import RegistryClient
from worker.settings import Settings

log = logging.getLogger(__name__)

#: minimum seconds between byte-count progress events (state changes always go out)
PROGRESS_INTERVAL = 0.1


def decompress_stream(chunks: Iterable[bytes], *, layer: str | None = None,
                      on_sniff: Callable[[str], None] | None = None) -> Iterator[bytes]:
    """Uncompressed chunks from compressed ``chunks``; compression sniffed from magic bytes."""
    it = iter(chunks)
    head = b""
    for chunk in it:
        head += chunk
        if len(head) >= 4:
            break
    compression = sniff_compression(head)
    if on_sniff is not None:
        on_sniff(compression)
    if compression == "none":
        if head:
            yield head
        yield from it
        return
    d = Decompressor(compression, layer=layer)

    def pieces() -> Iterator[bytes]:
        if head:
            yield head
        yield from it

    for chunk in pieces():
        yield from d.feed_bounded(chunk, CHUNK)
    tail = d.finish()
    if tail:
        yield tail


def _check_diff_id(image: str, desc: Descriptor, expected: str, actual: str) -> None:
    if expected and actual != expected:
        raise DigestMismatch(f"{image}: layer {desc.digest}: uncompressed content (diff_id)",
                             expected, actual)


@dataclass(frozen=True, slots=True)
class LayerTiming:
    """How long one downloaded layer took, both times counted from the start of its download.

    ``download_seconds``: network, blob digest and temp-file write done (the bytes are all on
    disk); ``index_seconds``: decompression, diff_id and entry index done too (the layer is
    pulled). Inflate and index run beside the download, so the second is often only a little
    longer than the first.
    """

    digest: str
    compressed_bytes: int
    uncompressed_bytes: int
    download_seconds: float
    index_seconds: float


class _KeptTar:
    """The layer's uncompressed bytes, copied to a temp file while the indexer reads them, so
    that exports read them back instead of inflating the blob again. A write error (a full
    disk) only drops the copy: the layer itself is still pulled."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self._fd = f.fileno()
        self.path = path
        self.ok = True

    def tee(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self.ok:
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self._fd, view):]
                except OSError as exc:
                    self.ok = False
                    # give the space back at once: the blob and its index still need it
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, 0)
                    log.warning("not keeping the uncompressed copy of a layer in %s: %s",
                                self.path.parent, exc.strerror or exc)
            yield chunk


class _DownloadStopped(Exception):
    """The download failed or was canceled: the indexer reading behind it stops."""


class _Tail:
    """A temp file one thread writes while another reads it back, right behind the writer.

    The writer never waits for the reader: bytes land on disk (the page cache) and the
    reader wakes up for them, so memory stays bounded whichever side is faster.
    """

    def __init__(self, fd: int, *, layer: str, where: str) -> None:
        self._fd = fd
        self._layer = layer
        self._where = where
        self._cond = threading.Condition()
        self._written = 0
        self._done = False
        self._aborted = False

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise LayerError(f"cannot write to the cache in {self._where}: "
                             f"{exc.strerror or exc}", layer=self._layer) from None
        with self._cond:
            self._written += len(chunk)
            self._cond.notify()

    def finish(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify()

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The file's bytes as they are written, until :meth:`finish`; raises
        :class:`_DownloadStopped` after :meth:`abort`."""
        pos = 0
        while True:
            with self._cond:
                while self._written == pos and not self._done and not self._aborted:
                    self._cond.wait()
                if self._aborted:
                    raise _DownloadStopped()
                available = self._written - pos
                if not available:
                    return
            try:
                data = os.pread(self._fd, min(available, size), pos)
            except OSError as exc:
                raise LayerError(f"cannot read back the download in {self._where}: "
                                 f"{exc.strerror or exc}", layer=self._layer) from None
            if not data:
                raise LayerError(f"the download in {self._where} shrank while being read",
                                 layer=self._layer)
            pos += len(data)
            yield data


def fetch_layer_to_cache(client: RegistryClient, ref: Reference, desc: Descriptor,
                         diff_id: str, cache: BlobCache, settings: Settings, *,
                         cancel: threading.Event | None = None,
                         on_bytes: Callable[[int], None] | None = None,
                         on_start: Callable[[], None] | None = None,
                         timings: list[LayerTiming] | None = None) -> tuple[LayerIndex, bool]:
    """Make one layer present, verified and indexed in ``cache``. Idempotent.

    The download (network, blob digest, temp file) runs in the calling thread; a second
    thread decompresses, hashes the diff_id and indexes the temp file right behind it.
    ``on_start`` is called when a download really begins (not for a cached layer); a
    downloaded layer's :class:`LayerTiming` is appended to ``timings``.
    Returns ``(index, was_cached)``. On any error nothing new is left in the cache: no blob,
    no index, no temp file.
    """
    image = str(ref)
    cached = _cached_index(cache, desc, diff_id, image)
    if cached is not None:
        return cached, True
    with cache.lock(desc.digest):
        # Another thread, process or host may have finished it while we waited.
        cached = _cached_index(cache, desc, diff_id, image)
        if cached is not None:
            return cached, True
        limits = IndexLimits.from_settings(settings)
        if cache.has(desc.digest):
            # Blob present without index (interrupted between the two renames): index the
            # verified blob from disk instead of downloading it again.
            sniffed: list[str] = []
            tar = index_tar_stream(
                decompress_stream(read_file_chunks(str(cache.path(desc.digest))),
                                  layer=desc.digest, on_sniff=sniffed.append),
                layer=desc.digest, limits=limits)
            _check_diff_id(image, desc, diff_id, tar.diff_id)
            index = _make_index(desc, tar.diff_id, sniffed[0] if sniffed else "none",
                                tar.uncompressed_size, tar.entries)
            cache.put_index(desc.digest, index)
            cache.touch(desc.digest)
            return index, False
        if on_start is not None:
            on_start()
        started = time.monotonic()
        with contextlib.ExitStack() as temps:
            f, tmp = temps.enter_context(cache.temp_file(desc.digest))
            keep = _KeptTar(*temps.enter_context(cache.temp_file(desc.digest))) \
                if settings.cache_uncompressed else None
            sniffed = []
            tail = _Tail(f.fileno(), layer=desc.digest, where=str(cache.root))
            indexed: list[TarIndex] = []
            failed: list[BaseException] = []
            index_done = [0.0]

            def index_job() -> None:
                try:
                    plain = decompress_stream(tail.chunks(), layer=desc.digest,
                                              on_sniff=sniffed.append)
                    indexed.append(index_tar_stream(
                        keep.tee(plain) if keep is not None else plain,
                        layer=desc.digest, limits=limits))
                except _DownloadStopped:
                    pass
                except BaseException as exc:  # handed to the download thread
                    failed.append(exc)
                finally:
                    index_done[0] = time.monotonic()

            indexer = threading.Thread(target=index_job, daemon=True,
                                       name=f"rootfs-export-index-{desc.digest[7:19]}")
            indexer.start()
            try:
                for chunk in client.stream_blob(ref, desc, cancel=cancel):
                    tail.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    # An unsafe entry or a limit ends the download at once (a bomb must not
                    # be fetched in full); a corrupt stream usually means a lying registry,
                    # so the (size-bounded) download goes on for the digest check to say so.
                    if failed and not isinstance(failed[0], CorruptLayer):
                        raise failed[0]
                downloaded = time.monotonic()
                tail.finish()
                while indexer.is_alive():
                    indexer.join(0.1)
                    if cancel is not None and cancel.is_set():
                        raise Canceled(f"{image}: layer {desc.digest}: canceled")
            except BaseException:
                tail.abort()
                indexer.join()
                raise
            if failed:
                raise failed[0]
            tar = indexed[0]
            if timings is not None:
                timings.append(LayerTiming(desc.digest, desc.size, tar.uncompressed_size,
                                           downloaded - started, index_done[0] - started))
            _check_diff_id(image, desc, diff_id, tar.diff_id)
            f.flush()
            compression = sniffed[0] if sniffed else "none"
            claimed = media_type_compression(desc.media_type)
            if claimed is not None and claimed != compression:
                log.info("%s: layer %s claims %s (%s) but is %s", image, desc.digest, claimed,
                         desc.media_type, compression)
            index = _make_index(desc, tar.diff_id, compression, tar.uncompressed_size,
                                tar.entries)
            # an uncompressed layer is its own tar: nothing to keep beside it
            kept = keep.path if keep is not None and keep.ok and compression != "none" else None
            try:
                cache.commit(desc.digest, tmp, index, tar=kept)
            except OSError as exc:
                cache.delete(desc.digest)
                raise LayerError(f"cannot store the layer in the cache in {cache.root}: "
                                 f"{exc.strerror or exc}", layer=desc.digest) from None
        return index, False


def _make_index(desc: Descriptor, diff_id: str, compression: str, usize: int,
                entries: tuple[IndexEntry, ...]) -> LayerIndex:
    return LayerIndex(digest=desc.digest, diff_id=diff_id, media_type=desc.media_type,
                      compression=compression, compressed_size=desc.size,
                      uncompressed_size=usize, entries=entries)


def _cached_index(cache: BlobCache, desc: Descriptor, diff_id: str,
                  image: str) -> LayerIndex | None:
    if not (cache.has(desc.digest) and cache.has_index(desc.digest)):
        return None
    try:
        index = cache.index(desc.digest)
    except CorruptLayer:
        log.warning("%s: cached index of layer %s is unreadable; indexing the blob again",
                    image, desc.digest)
        return None   # the verified blob is re-indexed from disk
    if index is None:
        return None
    _check_diff_id(image, desc, diff_id, index.diff_id)
    cache.touch(desc.digest)
    return index


class ProgressTracker:
    """Thread-safe per-layer state that emits :class:`ProgressEvent` snapshots."""

    def __init__(self, layers: tuple[Descriptor, ...], callback: ProgressCallback,
                 phase: Phase = Phase.DOWNLOAD) -> None:
        self._lock = threading.Lock()
        self._callback = callback
        self._phase = phase
        self._layers = [LayerProgress(d.digest, LayerState.WAITING, 0, d.size) for d in layers]
        self._last = 0.0

    def event(self, message: str = "") -> ProgressEvent:
        layers = tuple(self._layers)
        done_states = (LayerState.CACHED, LayerState.APPLIED)
        return ProgressEvent(phase=self._phase,
                             bytes_done=sum(lp.bytes_done for lp in layers),
                             bytes_total=sum(lp.bytes_total for lp in layers),
                             layers_done=sum(lp.state in done_states for lp in layers),
                             layers_total=len(layers), layers=layers, message=message)

    def update(self, i: int, *, state: LayerState | None = None, add_bytes: int = 0,
               bytes_done: int | None = None, message: str = "") -> None:
        with self._lock:
            lp = self._layers[i]
            new_bytes = lp.bytes_done + add_bytes if bytes_done is None else bytes_done
            self._layers[i] = LayerProgress(lp.digest, state or lp.state, new_bytes,
                                            lp.bytes_total)
            now = time.monotonic()
            if state is None and not message and now - self._last < PROGRESS_INTERVAL:
                return
            self._last = now
            event = self.event(message)
        self._callback(event)


def fetch_layers(resolved: ResolvedImage, settings: Settings, *,
                 credentials: Credentials | CredentialSource | None = None,
                 client: RegistryClient | None = None, cache: BlobCache | None = None,
                 progress: ProgressCallback = no_progress,
                 cancel: threading.Event | None = None,
                 layers: Iterable[int] | None = None,
                 timings: list[LayerTiming] | None = None) -> list[LayerIndex]:
    """Fetch all (or the given) layers of ``resolved`` into the cache, concurrently.

    At most ``settings.download_concurrency`` downloads run at once. The first failure stops
    the others promptly (they check a shared event between chunks) and is raised; it names the
    layer. Returns the indexes in layer order; each layer downloaded (not found in the cache)
    adds its :class:`LayerTiming` to ``timings``.
    """
    ref = parse_reference(resolved.reference)
    cache = cache or BlobCache(settings.cache_dir)
    own_client = client is None
    client = client or RegistryClient.for_reference(ref, settings, credentials=credentials)
    wanted = list(layers) if layers is not None else list(range(len(resolved.layers)))
    tracker = ProgressTracker(resolved.layers, progress)
    stop = threading.Event()
    diff_ids = resolved.config.diff_ids

    def watch_user_cancel() -> None:
        if cancel is not None:
            while not stop.is_set():
                if cancel.wait(0.05):
                    stop.set()
                    return

    def one(i: int) -> LayerIndex:
        desc = resolved.layers[i]
        if stop.is_set():
            raise Canceled(f"{resolved.reference}: layer {desc.digest}: canceled")
        try:
            # DOWNLOADING only once a download starts: a cached layer goes straight to CACHED.
            index, _ = fetch_layer_to_cache(
                client, ref, desc, diff_ids[i] if i < len(diff_ids) else "", cache, settings,
                cancel=stop, on_bytes=lambda n: tracker.update(i, add_bytes=n),
                on_start=lambda: tracker.update(i, state=LayerState.DOWNLOADING),
                timings=timings)
        except BaseException:
            tracker.update(i, state=LayerState.FAILED)
            stop.set()
            raise
        tracker.update(i, state=LayerState.CACHED, bytes_done=desc.size)
        return index

    watcher = threading.Thread(target=watch_user_cancel, daemon=True,
                               name="rootfs-export-cancel-watch")
    if cancel is not None:
        watcher.start()
    results: dict[int, LayerIndex] = {}
    try:
        workers = max(1, min(settings.download_concurrency, len(wanted) or 1))
        with ThreadPoolExecutor(max_workers=workers,
                                thread_name_prefix="rootfs-export-fetch") as pool:
            futures: dict[Future[LayerIndex], int] = {pool.submit(one, i): i for i in wanted}
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                stop_early = any(f.done() and f.exception() is not None for f in futures)
                if stop_early:
                    stop.set()
                    for f in futures:
                        f.cancel()
                wait(futures)
            except BaseException:
                # Ctrl-C or SIGTERM in this thread: the downloads must stop (and remove their
                # temp files) before the pool's exit waits for them.
                stop.set()
                for f in futures:
                    f.cancel()
                raise
        first_error: BaseException | None = None
        for f, i in futures.items():
            if f.cancelled():
                continue
            exc = f.exception()
            if exc is None:
                results[i] = f.result()
            elif first_error is None or (isinstance(first_error, Canceled)
                                         and not isinstance(exc, Canceled)):
                first_error = exc
        if cancel is not None and cancel.is_set():
            raise Canceled(f"{resolved.reference}: download canceled")
        if first_error is not None:
            raise first_error
    finally:
        stop.set()
        if own_client:
            client.close()
    if len(results) != len(wanted):  # pragma: no cover - cancellation without an error
        raise Canceled(f"{resolved.reference}: download canceled")
    progress(tracker.event("layers cached"))
    return [results[i] for i in wanted]


def fetch_one_layer(resolved: ResolvedImage, layer: int, settings: Settings, *,
                    credentials: Credentials | CredentialSource | None = None,
                    progress: ProgressCallback = no_progress,
                    cancel: threading.Event | None = None) -> LayerIndex:
    """Fetch layer number ``layer`` (the Celery fan-out unit). Idempotent."""
    if not 0 <= layer < len(resolved.layers):
        raise RootfsExportError(f"{resolved.reference}: no layer number {layer} "
                                f"(the image has {len(resolved.layers)})")
    return fetch_layers(resolved, settings, credentials=credentials, progress=progress,
                        cancel=cancel, layers=[layer])[0]
