"""The console device's configuration space: GET_CONFIG windows and SET_CONFIG writes.

Spec: virtio 1.2 §5.3.4 (``struct virtio_console_config { le16 cols; le16 rows;
le32 max_nr_ports; le32 emerg_wr; }``) and §5.3.5.1:

    "The device MUST allow a write to emerg_wr, even on an unconfigured device."
    "The device SHOULD transmit the lower byte written to emerg_wr to an appropriate log or
    output method."

So a write covering byte 8 (the low byte of ``emerg_wr``) yields an :class:`EmergencyWrite`
action for port 0's host side, whatever the device state; ``emerg_wr`` reads back as 0.
Writes to the read-only fields are ignored (logged). Reads and writes are byte windows
(``offset``, ``size``) anywhere inside the 12 bytes; anything reaching outside raises
:class:`ConfigAccessError` (the vhost-user layer turns it into a failed request).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import ConfigAccessError
from .ports import MAX_NR_PORTS
from .wire import CONFIG_SIZE, ConsoleConfig

__all__ = ["ConsoleConfigSpace", "EmergencyWrite", "EMERG_WR_OFFSET"]

logger = logging.getLogger(__name__)

EMERG_WR_OFFSET = 8
"""Offset of ``emerg_wr`` in the config structure."""


@dataclass(frozen=True, slots=True)
class EmergencyWrite:
    """The guest wrote ``emerg_wr``: send ``char`` (one byte) to port 0's host side.

    Spec: virtio 1.2 §5.3.5.1.
    """

    char: int

    @property
    def data(self) -> bytes:
        return bytes([self.char])


class ConsoleConfigSpace:
    """Config space contents and access. ``cols``/``rows`` mirror port 0's console size."""

    def __init__(self, max_nr_ports: int, cols: int = 0, rows: int = 0) -> None:
        if not 1 <= max_nr_ports <= MAX_NR_PORTS:
            raise ValueError(f"max_nr_ports {max_nr_ports} outside 1..{MAX_NR_PORTS}")
        self.max_nr_ports = max_nr_ports
        self.cols = cols
        self.rows = rows
        self.emergency_bytes = 0

    def as_struct(self) -> ConsoleConfig:
        return ConsoleConfig(self.cols, self.rows, self.max_nr_ports, 0)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the config structure (VHOST_USER_GET_CONFIG)."""
        self._check(offset, size)
        return self.as_struct().pack()[offset : offset + size]

    def write(self, offset: int, data: bytes) -> list[EmergencyWrite]:
        """Apply a driver write (VHOST_USER_SET_CONFIG); returns the actions it causes."""
        self._check(offset, len(data))
        actions: list[EmergencyWrite] = []
        end = offset + len(data)
        if offset <= EMERG_WR_OFFSET < end:
            char = data[EMERG_WR_OFFSET - offset]
            self.emergency_bytes += 1
            actions.append(EmergencyWrite(char))
        if offset < EMERG_WR_OFFSET:
            logger.info(
                "guest wrote read-only console config bytes %d..%d; ignored",
                offset,
                min(end, EMERG_WR_OFFSET) - 1,
            )
        return actions

    def set_size(self, cols: int, rows: int) -> bool:
        """Update cols/rows; True if they changed (then notify a non-multiport guest)."""
        for value in (cols, rows):
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"console size {cols}x{rows} outside 0..65535")
        changed = (cols, rows) != (self.cols, self.rows)
        self.cols, self.rows = cols, rows
        return changed

    @staticmethod
    def _check(offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > CONFIG_SIZE:
            raise ConfigAccessError(offset, size, CONFIG_SIZE)
