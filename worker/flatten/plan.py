"""The flattening planner: from per-layer indexes to the final tree (pure, no I/O).

Applies, bottom to top, the rules in ../shared/layer-semantics.md: later layers win, whiteouts
and opaque directories delete lower content, type changes replace whole subtrees, parents are
resolved through symlinks *inside* the root, hardlinks bind to the target as it is at that
moment. The result says, for every surviving path, which entry of which layer provides it, so
each surviving file's data is read once and written once, and deleted content is never read.

Decisions worth knowing (each has a test in ``tests/flatten``):

* A layer's whiteouts and opaque markers are applied first, against the state the lower layers
  left; then its other entries, in tar order (a duplicate path: the last one wins). So an
  opaque directory keeps the entries of its own layer whatever their order in the tar.
* Whiteouts and opaque markers never follow symlinks (overlayfs semantics: an upper directory
  replaces a lower symlink rather than merging through it), so ``lib/.wh.x`` over a lower
  ``lib -> usr/lib`` deletes nothing.
* Other entries resolve their parent directories through symlinks inside the root, the way a
  container runtime extracting into a chroot would: absolute targets restart at the root,
  relative ones at the symlink's directory, ``..`` at the root stays at the root (as it does
  in a chroot). More than :data:`MAX_SYMLINKS` expansions for one path (a loop) is an
  :class:`~worker.errors.UnsafeLayerEntry`, and so is an image whose symlinks make resolution
  add more than :data:`MAX_EXPANDED_COMPONENTS` components in total. A missing parent is
  created as an implied directory (mode 0755, root:root); a parent that is a file or a device
  is replaced by one. The last component is never followed.
* Entry *names* climbing above the root (``../x``, ``a/../../x``) never get here: the indexer
  rejects them with an UnsafeLayerEntry naming layer and path (``..`` inside the root is
  resolved lexically). Only symlink *targets* are clamped at the root, since that is how the
  guest kernel will resolve them once the tree is its ``/``.
* A hardlink shares the inode its target has when the link is applied. If a later layer
  replaces or deletes the target, the links keep the old content: one of them becomes the
  data owner and the others link to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from worker.cache.index import EntryKind, IndexEntry, LayerIndex
from worker.errors import LayerError, LimitExceeded, UnsafeLayerEntry

#: symlink expansions allowed while resolving one path (Linux uses 40 for ELOOP)
MAX_SYMLINKS = 40
#: path components that symlink expansion may add over a whole plan: legitimate images need
#: a handful; long targets followed by millions of entries would otherwise burn hours of CPU
MAX_EXPANDED_COMPONENTS = 10_000_000

BLOCK = 4096

_NON_DIR = frozenset({EntryKind.FILE, EntryKind.SYMLINK, EntryKind.CHAR, EntryKind.BLOCK,
                      EntryKind.FIFO})


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    path: str                      # final, canonical path (all parents are real directories)
    layer: int                     # index into the plan's layers of the entry providing it
    entry: IndexEntry              # metadata (and data location) for this path
    link_to: str | None = None     # hardlink: final path of the entry owning the inode's data
    implied: bool = False          # a parent directory no layer listed (mode 0755, root:root)

    @property
    def kind(self) -> EntryKind:
        """What to create: the entry's kind, or HARDLINK when ``link_to`` is set."""
        return EntryKind.HARDLINK if self.link_to is not None else self.entry.kind

    @property
    def has_data(self) -> bool:
        """True for a regular file (inode owner) whose bytes must be read from its layer."""
        return self.link_to is None and self.entry.kind == EntryKind.FILE \
            and self.entry.data_size > 0


@dataclass(frozen=True, slots=True)
class FlatPlan:
    layers: tuple[LayerIndex, ...]
    entries: tuple[PlannedEntry, ...]   # parents before children; deterministic order
    file_bytes: int                     # sum of apparent sizes of regular files (inodes once)
    file_blocks: int                    # 4 KiB blocks the data needs (sparse-aware)
    counts: dict[str, int]              # entries per EntryKind value, plus "implied"
    data_bytes: int = 0                 # bytes to read from layers (stored sizes, owners once)
    directories: int = 0                # directories incl. the root and implied ones
    inodes: int = 0                     # distinct inodes (hardlinks share one)
    symlink_bytes: int = 0              # sum of symlink target lengths (long ones need a block)
    xattr_bytes: int = 0                # sum of xattr name+value lengths

    def data_entries(self, layer: int) -> list[PlannedEntry]:
        """The entries whose data comes from layer ``layer``, in stream (offset) order."""
        out = [pe for pe in self.entries if pe.layer == layer and pe.has_data]
        out.sort(key=lambda pe: pe.entry.data_offset)
        return out

    def data_layers(self) -> dict[int, list[PlannedEntry]]:
        """Layer number -> its data entries in stream order; layers with none are absent."""
        by_layer: dict[int, list[PlannedEntry]] = {}
        for pe in self.entries:
            if pe.has_data:
                by_layer.setdefault(pe.layer, []).append(pe)
        for lst in by_layer.values():
            lst.sort(key=lambda pe: pe.entry.data_offset)
        return dict(sorted(by_layer.items()))


def check_plan_limits(plan: FlatPlan, *, max_uncompressed_bytes: int, max_entries: int,
                      max_path_length: int) -> None:
    """Re-check the configured limits on the flattened result (cheap; the index checked too)."""
    if len(plan.entries) > max_entries:
        raise LimitExceeded("flattened entry count", len(plan.entries), max_entries,
                            setting="ROOTFS_EXPORT_MAX_ENTRIES")
    if plan.data_bytes > max_uncompressed_bytes:
        raise LimitExceeded("flattened data size", plan.data_bytes, max_uncompressed_bytes,
                            setting="ROOTFS_EXPORT_MAX_UNCOMPRESSED_BYTES")
    for pe in plan.entries:
        n = len(os.fsencode(pe.path))
        if n > max_path_length:
            raise LimitExceeded("path length", n, max_path_length,
                                setting="ROOTFS_EXPORT_MAX_PATH_LENGTH",
                                layer=plan.layers[pe.layer].digest if plan.layers else None,
                                path=pe.path)


# -- the in-memory tree --------------------------------------------------------------------------

class _Inode:
    """The data of a non-directory: the entry that created it. Hardlinks share one."""

    __slots__ = ("layer", "entry")

    def __init__(self, layer: int, entry: IndexEntry) -> None:
        self.layer = layer
        self.entry = entry


class _Node:
    __slots__ = ("layer", "entry", "children", "implied", "inode")

    def __init__(self, layer: int, entry: IndexEntry, *, implied: bool = False,
                 inode: _Inode | None = None) -> None:
        self.layer = layer
        self.entry = entry          # for a hardlink: the HARDLINK entry that made this name
        self.implied = implied
        self.children: dict[str, _Node] | None = {} if entry.kind == EntryKind.DIR else None
        self.inode = inode

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def _implied_dir(path: str) -> IndexEntry:
    return IndexEntry(path=path, kind=EntryKind.DIR, mode=0o755)


def _split(path: str) -> list[str]:
    if path in (".", ""):
        return []
    comps = path.split("/")
    if "" in comps or "." in comps:
        comps = [c for c in comps if c and c != "."]
    return comps


class _Planner:
    def __init__(self, layers: Sequence[LayerIndex]) -> None:
        self.layers = layers
        self.root = _Node(-1, _implied_dir("."), implied=True)
        self.expanded = 0            # components added by symlink expansion so far

    # -- errors ----------------------------------------------------------------------------
    def _digest(self, layer: int) -> str | None:
        return self.layers[layer].digest if 0 <= layer < len(self.layers) else None

    def unsafe(self, layer: int, path: str, why: str) -> UnsafeLayerEntry:
        return UnsafeLayerEntry(why, layer=self._digest(layer), path=path)

    # -- path resolution -------------------------------------------------------------------------
    def _check_path(self, layer: int, path: str, comps: list[str]) -> None:
        if ".." in comps or "\0" in path:
            raise self.unsafe(layer, path, "path component '..' or NUL in an entry name")
        for comp in comps:
            self._check_length(layer, path, comp)

    def _check_component(self, layer: int, path: str, comp: str) -> None:
        if comp == ".." or "\0" in comp:
            # The index resolves ``..`` lexically and rejects climbing names; one left here is
            # a bug upstream or a hand-made index: never let it walk.
            raise self.unsafe(layer, path, "path component '..' or NUL in an entry name")
        self._check_length(layer, path, comp)

    def _check_length(self, layer: int, path: str, comp: str) -> None:
        # No Linux filesystem holds a longer name: refuse it for every format alike.
        size = len(os.fsencode(comp))
        if size > NAME_MAX:
            raise self.unsafe(layer, path, f"a path component of {size} bytes (the kernel "
                              f"allows at most {NAME_MAX})")

    def resolve_parent(self, layer: int, path: str, *, create: bool,
                       comps: list[str] | None = None) -> _Node | None:
        """Walk to the directory that will hold ``path``'s last component.

        Returns that directory's node. Symlinks met on the way are
        followed inside the root. Missing directories (or files in the way) are replaced by
        implied ones when ``create``; otherwise the node is None.
        """
        if comps is None:
            comps = _split(path)
        if not comps:
            raise self.unsafe(layer, path, "entry names the root but is not a directory")
        pending = comps[:-1]
        pending.reverse()            # a stack: pop() gives the next component
        stack: list[tuple[str, _Node]] = []   # canonical path of the walk so far
        node = self.root
        expansions = 0
        while pending:
            comp = pending.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                # Only symlink targets bring ``..`` here (entry names were checked): a chroot
                # keeps ``..`` at the root.
                if stack:
                    stack.pop()
                node = stack[-1][1] if stack else self.root
                continue
            if "\0" in comp:
                raise self.unsafe(layer, path, "NUL in a path component")
            assert node.children is not None
            child = node.children.get(comp)
            if child is None:
                if not create:
                    return None
                child = _Node(layer, _implied_dir(_join([c for c, _ in stack] + [comp])),
                              implied=True)
                node.children[comp] = child
            elif child.children is None:
                if child.inode is not None and child.inode.entry.kind == EntryKind.SYMLINK:
                    expansions += 1
                    if expansions > MAX_SYMLINKS:
                        raise self.unsafe(layer, path, f"more than {MAX_SYMLINKS} symlinks "
                                          "while resolving its parent directory (a loop?)")
                    target = (child.inode.entry if child.inode else child.entry).linkname
                    if target.startswith("/"):
                        stack = []
                        node = self.root
                    tcomps = [c for c in target.split("/") if c]
                    self.expanded += len(tcomps)
                    if self.expanded > MAX_EXPANDED_COMPONENTS:
                        raise self.unsafe(layer, path, "resolving parent directories through "
                                          "symlinks takes too much work in this image (more "
                                          f"than {MAX_EXPANDED_COMPONENTS} path components)")
                    pending.extend(reversed(tcomps))
                    continue
                if not create:
                    return None
                # A file or device where this layer needs a directory: the later layer wins.
                child = _Node(layer, _implied_dir(_join([c for c, _ in stack] + [comp])),
                              implied=True)
                assert node.children is not None
                node.children[comp] = child
            stack.append((comp, child))
            node = child
        return node

    def lookup(self, layer: int, path: str) -> _Node | None:
        """Resolve ``path`` (parents followed, last component not) to its node, if any."""
        comps = _split(path)
        if not comps:
            return self.root
        parent = self.resolve_parent(layer, path, create=False, comps=comps)
        if parent is None or parent.children is None:
            return None
        return parent.children.get(comps[-1])

    # -- applying one layer --------------------------------------------------------------------
    def _walk_nofollow(self, comps: list[str]) -> _Node | None:
        node = self.root
        for comp in comps:
            if node.children is None:
                return None
            nxt = node.children.get(comp)
            if nxt is None:
                return None
            node = nxt
        return node

    def apply_layer(self, layer: int, entries: Sequence[IndexEntry]) -> None:
        # Pass 1: opaque markers and whiteouts against the lower state, never through symlinks.
        for e in entries:
            if e.kind == EntryKind.OPAQUE:
                comps = _split(e.path)
                for c in comps:
                    self._check_component(layer, e.path, c)
                node = self._walk_nofollow(comps)
                if node is not None and node.children is not None:
                    node.children.clear()
                elif node is not None and comps:
                    # The layer says ``dir`` is a directory: whatever non-directory the lower
                    # layers had there goes (the layer's own entry, if any, comes in pass 2).
                    parent = self._walk_nofollow(comps[:-1])
                    assert parent is not None and parent.children is not None
                    parent.children[comps[-1]] = _Node(layer, _implied_dir(e.path),
                                                       implied=True)
            elif e.kind == EntryKind.WHITEOUT:
                comps = _split(e.path)
                if not comps:
                    raise self.unsafe(layer, e.path, "whiteout of the root directory")
                for c in comps:
                    self._check_component(layer, e.path, c)
                parent = self._walk_nofollow(comps[:-1])
                if parent is not None and parent.children is not None:
                    parent.children.pop(comps[-1], None)
        # Pass 2: everything else, in tar order (the last of duplicate paths wins).
        for e in entries:
            if e.kind in (EntryKind.OPAQUE, EntryKind.WHITEOUT):
                continue
            comps = _split(e.path)
            self._check_path(layer, e.path, comps)
            self.apply_entry(layer, e, comps)

    def apply_entry(self, layer: int, e: IndexEntry, comps: list[str]) -> None:
        if not comps:
            if e.kind != EntryKind.DIR:
                raise self.unsafe(layer, e.path, f"the root directory cannot be a {e.kind}")
            self.root.entry, self.root.layer, self.root.implied = e, layer, False
            return
        name = comps[-1]
        parent = self.resolve_parent(layer, e.path, create=True, comps=comps)
        assert parent is not None and parent.children is not None
        existing = parent.children.get(name)
        if e.kind == EntryKind.DIR:
            if existing is not None and existing.children is not None:
                # Directory over directory: children stay, metadata is the new one.
                existing.entry, existing.layer, existing.implied = e, layer, False
                return
            parent.children[name] = _Node(layer, e)
            return
        if e.kind == EntryKind.HARDLINK:
            inode = self._link_target(layer, e)
            parent.children[name] = _Node(layer, e, inode=inode)
            return
        if e.kind not in _NON_DIR:
            raise LayerError(f"unsupported entry kind {e.kind!r}", layer=self._digest(layer),
                             path=e.path)
        parent.children[name] = _Node(layer, e, inode=_Inode(layer, e))

    def _link_target(self, layer: int, e: IndexEntry) -> _Inode:
        target = e.linkname
        for c in _split(target):
            self._check_component(layer, e.path, c)
        node = self.lookup(layer, target)
        if node is None:
            raise LayerError(f"hardlink target {target!r} does not exist (in this layer before "
                             "the link, or in a lower layer)", layer=self._digest(layer),
                             path=e.path)
        if node.inode is None:
            raise LayerError(f"hardlink target {target!r} is a directory",
                             layer=self._digest(layer), path=e.path)
        return node.inode

    # -- the result ----------------------------------------------------------------------------
    def walk(self) -> Iterator[tuple[str, _Node]]:
        """Pre-order, children sorted by their bytes: parents first, deterministic."""
        yield ".", self.root
        todo: list[tuple[str, _Node]] = []

        def push(prefix: str, node: _Node) -> None:
            assert node.children is not None
            kids = sorted(node.children.items(), key=lambda kv: os.fsencode(kv[0]),
                          reverse=True)
            for name, child in kids:
                todo.append((name if prefix == "." else prefix + "/" + name, child))

        push(".", self.root)
        while todo:
            path, node = todo.pop()
            yield path, node
            if node.children is not None:
                push(path, node)


def _join(comps: list[str]) -> str:
    return "/".join(comps) if comps else "."


def _blocks(entry: IndexEntry) -> int:
    if entry.sparse is None:
        return (entry.size + BLOCK - 1) // BLOCK
    total = 0
    last = -1
    for off, length in sorted(entry.sparse):
        if length <= 0:
            continue
        first, end = off // BLOCK, (off + length - 1) // BLOCK
        if first <= last:
            first = last + 1
        if end >= first:
            total += end - first + 1
            last = end
    return total


#: longest file name (one path component) and symlink target the kernel holds, in bytes
NAME_MAX = 255
SYMLINK_MAX = 4095
#: xattr limits of the kernel (XATTR_NAME_MAX, XATTR_SIZE_MAX) and the namespaces it knows
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_NAMESPACES = ("user.", "trusted.", "security.", "system.")


def xattr_refusal(name: str, value: bytes) -> str | None:
    """Why the kernel (or a tool we feed it to) cannot take xattr ``name``; None if it can."""
    raw = os.fsencode(name)
    if any(b < 0x20 or b == 0x7F for b in raw):
        return f"xattr name {name!r} holds a control character"
    if not name.startswith(XATTR_NAMESPACES) or name in XATTR_NAMESPACES:
        return (f"xattr name {name!r} is not in a known namespace "
                f"({', '.join(XATTR_NAMESPACES)})")
    if len(raw) > XATTR_NAME_MAX:
        return f"xattr name {name!r} is {len(raw)} bytes long (at most {XATTR_NAME_MAX})"
    if len(value) > XATTR_SIZE_MAX:
        return f"xattr {name!r} has a {len(value)}-byte value (at most {XATTR_SIZE_MAX})"
    return None


#: uid/gid 2^32-1 is (uid_t)-1, "no change" to chown; ext4 stores 32 bits
_MAX_ID = (1 << 32) - 2


def _check_ids(planner: _Planner, pe: PlannedEntry) -> None:
    """Reject values no filesystem can hold or no syscall takes (a hostile header), naming
    layer and path."""
    e = pe.entry
    bad = None
    if not (0 <= e.uid <= _MAX_ID and 0 <= e.gid <= _MAX_ID):
        bad = f"uid/gid {e.uid}/{e.gid} out of range (0..{_MAX_ID})"
    elif e.kind in (EntryKind.CHAR, EntryKind.BLOCK) and not (
            0 <= e.devmajor < (1 << 12) and 0 <= e.devminor < (1 << 20)):
        bad = f"device number {e.devmajor},{e.devminor} out of range (major < 4096, " \
              "minor < 1048576)"
    elif "\0" in e.linkname or any(not k or "\0" in k for k, _ in e.xattrs):
        bad = "NUL byte in a link target or an empty/NUL xattr name"
    elif e.kind == EntryKind.SYMLINK and not e.linkname:
        bad = "symlink with an empty target"
    if bad:
        raise LayerError(bad, layer=planner._digest(pe.layer), path=pe.path)
    if e.kind == EntryKind.SYMLINK and len(os.fsencode(e.linkname)) > SYMLINK_MAX:
        bad = (f"symlink target of {len(os.fsencode(e.linkname))} bytes (the kernel allows at "
               f"most {SYMLINK_MAX})")
    for name, value in e.xattrs:
        bad = bad or xattr_refusal(name, value)
    if bad:
        raise UnsafeLayerEntry(bad, layer=planner._digest(pe.layer), path=pe.path)


def plan_layers(layers: Sequence[LayerIndex], *, max_path_length: int | None = None
                ) -> FlatPlan:
    """Compute the final tree; raise UnsafeLayerEntry / LayerError naming layer and path.

    ``max_path_length`` (bytes) bounds final paths, which symlinked parents can lengthen.
    """
    planner = _Planner(layers)
    for i, layer in enumerate(layers):
        planner.apply_layer(i, layer.entries)

    walked = list(planner.walk())
    # Hardlinked inodes: pick the data owner (the original name if it survived, else the
    # first surviving name in tree order).
    owners: dict[int, str] = {}
    for path, node in walked:
        if node.inode is not None and node.entry is node.inode.entry:
            owners[id(node.inode)] = path
    for path, node in walked:
        if node.inode is not None:
            owners.setdefault(id(node.inode), path)

    entries: list[PlannedEntry] = []
    counts: dict[str, int] = {}
    file_bytes = file_blocks = data_bytes = directories = inodes = 0
    symlink_bytes = xattr_bytes = 0
    for path, node in walked:
        if max_path_length is not None and len(os.fsencode(path)) > max_path_length:
            raise LimitExceeded("path length", len(os.fsencode(path)), max_path_length,
                                setting="ROOTFS_EXPORT_MAX_PATH_LENGTH",
                                layer=planner._digest(node.layer), path=path)
        if node.inode is None:
            pe = PlannedEntry(path, max(node.layer, 0), node.entry, implied=node.implied)
            directories += 1
            inodes += 1
            if node.implied:
                counts["implied"] = counts.get("implied", 0) + 1
        else:
            owner = owners[id(node.inode)]
            ino = node.inode
            if owner == path:
                pe = PlannedEntry(path, ino.layer, ino.entry)
                inodes += 1
                if ino.entry.kind == EntryKind.FILE:
                    file_bytes += ino.entry.size
                    file_blocks += _blocks(ino.entry)
                    data_bytes += ino.entry.data_size
                elif ino.entry.kind == EntryKind.SYMLINK:
                    symlink_bytes += len(os.fsencode(ino.entry.linkname))
            else:
                pe = PlannedEntry(path, node.layer, node.entry, link_to=owner)
        if pe.link_to is None:
            _check_ids(planner, pe)
        if pe.link_to is None and pe.entry.xattrs:
            xattr_bytes += sum(len(k) + len(v) for k, v in pe.entry.xattrs)
        kind = str(pe.kind)
        counts[kind] = counts.get(kind, 0) + 1
        entries.append(pe)
    return FlatPlan(layers=tuple(layers), entries=tuple(entries), file_bytes=file_bytes,
                    file_blocks=file_blocks, counts=counts, data_bytes=data_bytes,
                    directories=directories, inodes=inodes, symlink_bytes=symlink_bytes,
                    xattr_bytes=xattr_bytes)


__all__ = ["FlatPlan", "PlannedEntry", "plan_layers", "check_plan_limits", "MAX_SYMLINKS"]
