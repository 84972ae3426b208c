"""Listing an image-folder tree: every path under the source becomes a sample or a rejection.

The rules (also in the README, "Input rules"):

- A sample is a regular file with an image extension inside a class folder
  (``root/<class>/...``, any depth); its class is the top-level folder's name.
- Hidden entries (name starting with ``.``) and system entries (``Thumbs.db``, ``desktop.ini``,
  ``__MACOSX``, ...) are not read; each file under them is listed as ``hidden`` / ``system``.
- A file directly in the root belongs to no class: ``no_class``. Other files with no image
  extension: ``not_image``; fifos, sockets, devices: ``not_regular``.
- Links are followed once. A link to a file is read at the link's path unless the same file
  (device, inode) is already an input; then it, like a second hard link, is a ``duplicate``
  naming the first path (real paths are listed before links, so the real path wins). A link
  to a folder outside the source is followed, once per real folder. A link to a folder inside
  the source is not followed (``link_inside``: its files are read where they are), nor is a
  link to a folder that encloses it (``link_loop``). A broken link: ``broken_link``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from dml.data.records import IMAGE_EXTENSIONS, Record, Rejection
from dml.progress import progress

# Compared case-insensitively; names starting with "." are hidden by the first rule already.
SYSTEM_NAMES = {
    "thumbs.db",
    "ehthumbs.db",
    "desktop.ini",
    "__macosx",
    "$recycle.bin",
    "system volume information",
    "@eadir",
}


def rule_for_name(name: str) -> str | None:
    """``hidden`` or ``system`` when a file or folder of this name is not read, else None."""
    if name.startswith("."):
        return "hidden"
    if name.lower() in SYSTEM_NAMES:
        return "system"
    return None


def _encloses(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


@dataclass
class _PendingLink:
    rel: str
    path: str
    class_name: str | None
    stack: tuple[str, ...]


@dataclass
class FolderListing:
    """The result of `list_folder`: records (samples and rejections) and sample sizes in bytes."""

    records: list[Record] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)


class _Walker:
    """One listing pass; see the module docstring for the rules it applies."""

    def __init__(self, root: str):
        self.root = root
        self.root_real = os.path.realpath(root)
        self.out = FolderListing()
        self.first_by_inode: dict[tuple[int, int], str] = {}
        self.walked_dirs: dict[str, str] = {}  # real folder -> the rel path it was read under
        self.pending: list[_PendingLink] = []
        self.progress = progress(desc="prepare: listing", unit="path")

    def reject(self, rel: str, code: str, reason: str) -> None:
        self.out.records.append(Record(rel, "", rejection=Rejection(code, reason)))

    def run(self) -> FolderListing:
        # Real files and folders first, links after, so a file reached both ways is read at
        # its real path. Within each pass the order is sorted, so listings are deterministic.
        self.walk(self.root, "", None, (self.root_real,), defer_links=True)
        for link in sorted(self.pending, key=lambda p: p.rel.split(os.sep)):
            self.link(link)
        self.out.records.sort(key=lambda r: r.source_id.split(os.sep))
        self.progress.close()
        return self.out

    def walk(self, path: str, rel_dir: str, class_name: str | None, stack: tuple[str, ...], defer_links: bool) -> None:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.reject(rel_dir or ".", "unreadable", f"folder cannot be listed ({exc.strerror})")
            return
        self.progress.update(len(entries))
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name)
            rule = rule_for_name(entry.name)
            if rule:
                self.reject_all(entry.path, rel, rule)
            elif entry.is_symlink():
                link = _PendingLink(rel, entry.path, class_name, stack)
                if defer_links:
                    self.pending.append(link)
                else:
                    self.link(link)
            elif entry.is_dir(follow_symlinks=False):
                self.folder(entry.path, rel, class_name or entry.name, stack, defer_links)
            else:
                self.file(rel, entry.path, class_name, entry.stat(follow_symlinks=False))

    def folder(self, path: str, rel: str, class_name: str, stack: tuple[str, ...], defer_links: bool) -> None:
        real = os.path.realpath(path)
        if real in self.walked_dirs:
            self.reject(rel, "duplicate", f"same folder as {self.walked_dirs[real]}, already read")
            return
        self.walked_dirs[real] = rel
        self.walk(path, rel, class_name, (*stack, real), defer_links)

    def file(self, rel: str, path: str, class_name: str | None, st: os.stat_result) -> None:
        if class_name is None:
            self.reject(rel, "no_class", "not inside a class folder")
        elif not stat.S_ISREG(st.st_mode):
            self.reject(rel, "not_regular", "not a regular file")
        elif os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            self.reject(rel, "not_image", f"not an image file extension ({os.path.splitext(rel)[1] or 'none'})")
        elif (first := self.first_by_inode.get((st.st_dev, st.st_ino))) is not None:
            self.reject(rel, "duplicate", f"same file as {first}, already an input")
        else:
            self.first_by_inode[(st.st_dev, st.st_ino)] = rel
            self.out.records.append(Record(rel, class_name))
            self.out.sizes[rel] = st.st_size

    def link(self, link: _PendingLink) -> None:
        try:
            st = os.stat(link.path)
        except OSError as exc:
            self.reject(link.rel, "broken_link", f"broken link to {os.readlink(link.path)} ({exc.strerror})")
            return
        if not stat.S_ISDIR(st.st_mode):
            self.file(link.rel, link.path, link.class_name, st)
            return
        target = os.path.realpath(link.path)
        if any(_encloses(target, real) for real in link.stack):
            self.reject(link.rel, "link_loop", f"link to {target}, a folder that encloses it (a loop): not followed")
        elif _encloses(self.root_real, target):
            inside = os.path.relpath(target, self.root_real)
            self.reject(link.rel, "link_inside", f"link to {inside} inside the source: read there, not followed")
        else:
            self.folder(link.path, link.rel, link.class_name or os.path.basename(link.rel), link.stack, False)

    def reject_all(self, path: str, rel: str, code: str) -> None:
        """List ``path`` (and, for a real folder, every entry under it, links unfollowed)."""
        reason = {"hidden": "hidden (name starts with '.')", "system": "system file or folder"}[code]
        if os.path.islink(path) or not os.path.isdir(path):
            self.reject(rel, code, reason)
            return

        def unreadable(exc: OSError) -> None:
            self.reject(os.path.relpath(exc.filename, self.root), code, f"{reason}; folder cannot be listed")

        for dirpath, dirnames, filenames in os.walk(path, onerror=unreadable):
            sub = os.path.join(rel, os.path.relpath(dirpath, path)) if dirpath != path else rel
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in filenames + links:
                self.reject(os.path.normpath(os.path.join(sub, name)), code, reason)


def list_folder(root: str | os.PathLike) -> FolderListing:
    """List every path under ``root`` as a sample (label = class folder) or a rejection."""
    return _Walker(str(root)).run()
