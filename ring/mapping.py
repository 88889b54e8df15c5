"""Map a guest memory region from a file descriptor (the only ``mmap`` caller in ``ring``).

Spec: vhost-user "Memory regions description" (``mmap_offset``), VHOST_USER_ADD_MEM_REG.
"""

from __future__ import annotations

import logging
import mmap

from ring.errors import MemoryMapError
from ring.memory import DirtyLog, Region

__all__ = ["map_region", "map_log", "unmap_region"]

log = logging.getLogger(__name__)


def map_region(fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> Region:
    """Map ``size + mmap_offset`` bytes of ``fd`` shared read-write; the region's buffer is the
    ``size`` bytes after ``mmap_offset``. The caller keeps ownership of ``fd`` (it may be
    closed right after: the mapping holds its own reference).

    ``MemoryMapError`` if the mapping fails.
    """
    if fd < 0:  # mmap(-1, ...) would silently make an anonymous mapping
        raise MemoryMapError(f"bad region fd {fd}")
    if size <= 0 or mmap_offset < 0:
        raise MemoryMapError(f"bad region size {size} / mmap_offset {mmap_offset}")
    try:
        mm = mmap.mmap(fd, size + mmap_offset, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise MemoryMapError(f"mmap of fd {fd} ({size + mmap_offset} bytes) failed: {exc}") from exc
    buffer = memoryview(mm)[mmap_offset : mmap_offset + size]
    return Region(gpa=gpa, size=size, uva=uva, mmap_offset=mmap_offset, buffer=buffer)


def map_log(fd: int, size: int, offset: int = 0) -> DirtyLog:
    """Map the dirty log shared memory (VHOST_USER_SET_LOG_BASE: ``size`` bytes at ``offset``).

    Spec: vhost-user VHOST_USER_SET_LOG_BASE.
    """
    if fd < 0:
        raise MemoryMapError(f"bad log fd {fd}")
    try:
        mm = mmap.mmap(fd, size + offset, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise MemoryMapError(f"mmap of log fd {fd} failed: {exc}") from exc
    return DirtyLog(memoryview(mm)[offset : offset + size])


def unmap_region(region: Region) -> bool:
    """Release the mapping behind a region made by :func:`map_region`.

    Returns True when the memory was unmapped now; False when memoryviews into it are still
    alive (chains in flight): then the mapping goes away when the last of them is dropped.
    """
    buffer = region.buffer
    mm = getattr(buffer, "obj", buffer)
    if not isinstance(mm, mmap.mmap):
        return False
    try:
        region.view.release()
        if isinstance(buffer, memoryview):
            buffer.release()
        mm.close()
    except BufferError:
        log.debug("region %#x still has live views; unmapped when they go", region.gpa)
        return False
    return True
