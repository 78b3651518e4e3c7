"""Who may talk to the server, and what the kernel says a peer's uffd is.

Pure functions over plain text and numbers, so they are tested without
root; uffdsrv/system/ident.py reads the files and makes the calls.

* Access: with no --allow-uid/--allow-gid the socket is 0600 and only root
  and the server's own uid may connect (SO_PEERCRED is checked too, not
  only the file mode). With them, the socket opens to everyone (0666) or,
  for exactly one group and no uids, to that group (0660), and a peer whose
  uid or groups are not listed is refused.
* Privilege: root and the server's uid may act on any pid; anyone else
  only on its own.
* A uffd's truth is in /proc/self/fdinfo/FD ("API:\\t<api>:<features>:<ioctls>",
  features with UFFD_FEATURE_INITIALIZED once UFFDIO_API ran), not in
  what the peer claims in HELLO.
* Which mm a uffd belongs to is in no file; a registration through it shows
  as "um" in VmFlags of the registered VMA in /proc/PID/smaps of that mm.
"""

FEATURE_INITIALIZED = 1 << 31  # the kernel's UFFD_FEATURE_INITIALIZED (internal bit)


def parse_ids(text: str) -> frozenset[int]:
    """'1000,1001' -> {1000, 1001}; names are not resolved here."""
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) >= 1 << 32:
            raise ValueError(f"{part!r} is not a numeric id")
        out.add(int(part))
    return frozenset(out)


def socket_mode(allow_uids, allow_gids) -> tuple[int, int | None]:
    """-> (file mode, group to chown to or None)."""
    if not allow_uids and not allow_gids:
        return 0o600, None
    if not allow_uids and len(allow_gids) == 1:
        return 0o660, next(iter(allow_gids))
    return 0o666, None


def peer_allowed(uid: int, gids, server_uid: int, allow_uids=(), allow_gids=()) -> bool:
    if uid < 0:
        return False  # no credentials: never
    if uid == 0 or uid == server_uid or uid in allow_uids:
        return True
    return any(g in allow_gids for g in gids)


def privileged(uid: int, server_uid: int) -> bool:
    return uid == 0 or uid == server_uid


def fdinfo_features(text: str) -> int | None:
    """The features the kernel granted a uffd, or None if it has not been
    through UFFDIO_API (or the text is not a uffd's fdinfo)."""
    for line in text.splitlines():
        if line.startswith("API:"):
            parts = line.split(":", 1)[1].strip().split(":")
            try:
                features = int(parts[1], 16)
            except (IndexError, ValueError):
                return None
            if not features & FEATURE_INITIALIZED:
                return None
            return features & ~FEATURE_INITIALIZED
    return None


def vmflags_at(smaps: str, addr: int) -> set[str] | None:
    """VmFlags of the VMA holding addr in /proc/PID/smaps text, or None if
    no VMA holds it."""
    inside = False
    for line in smaps.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            try:
                inside = int(lo, 16) <= addr < int(hi, 16)
            except ValueError:
                inside = False
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    return None
