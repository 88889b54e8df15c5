"""QMP server protocol, sans-I/O: bytes in, bytes out, one object per client.

Spec: QEMU docs/interop/qmp-spec.rst (QEMU Machine Protocol Specification) — "Server
Greeting", "Issuing Commands", "Commands Responses", "Asynchronous events", "Forcing the JSON
parser into known-good state", "Capabilities Negotiation", "Compatibility Considerations".
Error texts follow QEMU's own (qapi/qmp-dispatch.c, monitor/qmp.c, the QAPI input visitor) so
that clients written against QEMU see the same classes and wording.

The pieces:

- ``QmpServerProtocol`` — one client connection: ``greeting()`` once, then
  ``receive(data) -> bytes`` for every chunk read (JSON values may be split across chunks or
  several may share one chunk; the framing is JSON-value boundaries, not lines, as in QEMU's
  streaming parser). It never reads a clock: events are encoded by ``encode_event(name,
  data, timestamp_s)`` with the time passed in by the adapter.
- ``CommandRegistry`` — commands devices register: ``register(name, handler, *,
  args_schema)``. One per daemon, created by the daemon and passed in (no global registry).
- ``QmpCommandError(error_class, desc)`` — what a handler raises to answer with an error.

Exceptions (this module only; the management layer has no others)::

    QmpCommandError      a command failed; becomes {"error": ...}    .error_class, .desc
    (ValueError          raised by CommandRegistry.register for a bad or duplicate name/schema)

Deliberate deviations from QEMU, each marked where implemented: the capability ``oob`` is
not offered (so ``exec-oob`` is an unexpected member, exactly QEMU's answer when OOB is not
negotiated); one JSON value is limited to ``max_message_bytes`` (default 1 MiB; QEMU allows
64 MiB) and ``max_nesting`` (default 64; QEMU 1024, Python's parser recurses).
"""

from __future__ import annotations

import enum
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

log = logging.getLogger(__name__)

JsonValue = Any
Handler = Callable[[dict[str, JsonValue]], JsonValue]

MAX_MESSAGE_BYTES = 1 << 20
MAX_NESTING = 64


class ErrorClass(str, enum.Enum):
    """QMP error classes (QEMU qapi/error.json ``QapiErrorClass``), spelled as on the wire."""

    GenericError = "GenericError"
    CommandNotFound = "CommandNotFound"
    DeviceNotActive = "DeviceNotActive"
    DeviceNotFound = "DeviceNotFound"
    KVMMissingCap = "KVMMissingCap"


class QmpCommandError(Exception):
    """A command handler's failure, sent to the client as ``{"error": {...}}``.

    Spec: qmp-spec.rst "Error" — ``{"error": {"class": json-string, "desc": json-string}}``.
    """

    def __init__(self, error_class: ErrorClass | str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = ErrorClass(error_class)
        self.desc = desc

    def to_json(self) -> dict[str, str]:
        return {"class": self.error_class.value, "desc": self.desc}


class QmpState(enum.Enum):
    """Where a client connection stands (qmp-spec.rst "Capabilities Negotiation")."""

    NEGOTIATION = "negotiation"   # only qmp_capabilities runs; no events
    COMMAND = "command"           # all commands run; events delivered
    QUIT = "quit"                 # ``quit`` answered; input ignored, owner asked to stop
    CLOSED = "closed"             # the client sent EOF


# -- command registry ------------------------------------------------------------------


class ArgType(enum.Enum):
    """Argument types, named as QAPI's built-in types; ``expected`` is QEMU's error word."""

    STR = "str"
    INT = "int"
    NUMBER = "number"
    BOOL = "bool"
    OBJECT = "object"
    ARRAY = "array"
    ANY = "any"

    @property
    def expected(self) -> str:
        return _EXPECTED[self]

    def accepts(self, value: JsonValue) -> bool:
        if self is ArgType.ANY:
            return True
        if self is ArgType.INT:
            return isinstance(value, int) and not isinstance(value, bool)
        if self is ArgType.NUMBER:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, _PY_TYPES[self])


_EXPECTED = {
    ArgType.STR: "string", ArgType.INT: "integer", ArgType.NUMBER: "number",
    ArgType.BOOL: "boolean", ArgType.OBJECT: "object", ArgType.ARRAY: "array",
    ArgType.ANY: "any",
}
_PY_TYPES = {ArgType.STR: str, ArgType.BOOL: bool, ArgType.OBJECT: dict, ArgType.ARRAY: list}

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")

BUILTIN_COMMANDS = ("qmp_capabilities", "query-commands", "query-version", "quit")


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """One declared argument of a command."""

    name: str
    type_: ArgType
    optional: bool


@dataclass(frozen=True, slots=True)
class Command:
    """A registered command: its handler and its arguments in declaration order."""

    name: str
    handler: Handler
    args: tuple[ArgSpec, ...]

    def validate(self, arguments: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
        """Check ``arguments`` against the schema; return a fresh dict for the handler.

        Spec: qmp-spec.rst "Compatibility Considerations" — the server "generates an error if
        a value does not have the expected type for its key, or if it does not understand a
        key that the Client included", before any side effect. Order as QEMU's input
        visitor: declared members in order (missing, then mistyped), then unexpected keys.
        """
        for spec in self.args:
            if spec.name not in arguments:
                if not spec.optional:
                    raise QmpCommandError(ErrorClass.GenericError,
                                          f"Parameter '{spec.name}' is missing")
                continue
            if not spec.type_.accepts(arguments[spec.name]):
                raise QmpCommandError(
                    ErrorClass.GenericError,
                    f"Invalid parameter type for '{spec.name}', expected: {spec.type_.expected}")
        declared = {spec.name for spec in self.args}
        for key in arguments:
            if key not in declared:
                raise QmpCommandError(ErrorClass.GenericError,
                                      f"Parameter '{key}' is unexpected")
        return dict(arguments)


class CommandRegistry:
    """The commands a management server offers beyond the QMP built-ins.

    ``register(name, handler, *, args_schema)``: ``handler(arguments: dict) -> JSON value``
    (``None`` answers ``{}`` as QEMU does for commands without data). ``args_schema`` maps
    argument names to an ``ArgType`` or its string value (``"str"``, ``"int"``,
    ``"number"``, ``"bool"``, ``"object"``, ``"array"``, ``"any"``); a leading ``*`` marks an
    optional argument, as in QAPI schemas: ``{"name": "str", "*timeout": "int"}``. The
    handler receives only validated arguments (absent optionals stay absent). A handler
    raising ``QmpCommandError`` answers with that error; any other exception is logged and
    answers ``GenericError`` (the server keeps going).
    """

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def register(self, name: str, handler: Handler, *,
                 args_schema: Mapping[str, ArgType | str] | None = None) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid QMP command name {name!r}")
        if name in BUILTIN_COMMANDS:
            raise ValueError(f"QMP command {name!r} is built in")
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        args: list[ArgSpec] = []
        for key, type_ in (args_schema or {}).items():
            optional = key.startswith("*")
            arg_name = key[1:] if optional else key
            if not _NAME_RE.match(arg_name) or any(a.name == arg_name for a in args):
                raise ValueError(f"invalid or duplicate argument {key!r} for {name!r}")
            args.append(ArgSpec(arg_name, ArgType(type_), optional))
        self._commands[name] = Command(name, handler, tuple(args))

    def unregister(self, name: str) -> None:
        """Remove a command (a device going away); unknown names raise ``KeyError``."""
        del self._commands[name]

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def names(self) -> list[str]:
        return sorted(self._commands)

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)


# -- wire encoding ---------------------------------------------------------------------

_CRLF = b"\r\n"


def encode_message(message: Mapping[str, JsonValue]) -> bytes:
    """One server message. Spec: qmp-spec.rst — the server "sends its output encoded in
    ASCII"; "All interactions transmitted by the Server are json-objects, always
    terminating with CRLF"."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False).encode("ascii") + _CRLF


def encode_event(name: str, data: Mapping[str, JsonValue] | None,
                 timestamp_s: float | None) -> bytes:
    """An asynchronous event. Spec: qmp-spec.rst "Asynchronous events".

    ``timestamp_s`` is Unix time in seconds (the adapter reads the clock); ``None`` means the
    host time could not be read, which the spec encodes as seconds = microseconds = -1.
    """
    if timestamp_s is None:
        stamp = {"seconds": -1, "microseconds": -1}
    else:
        micros = int(round(timestamp_s * 1_000_000))
        stamp = {"seconds": micros // 1_000_000, "microseconds": micros % 1_000_000}
    message: dict[str, JsonValue] = {"event": name}
    if data is not None:
        message["data"] = dict(data)
    message["timestamp"] = stamp
    return encode_message(message)


def _error(error_class: ErrorClass, desc: str, id_: tuple[JsonValue, ...] = ()) -> bytes:
    message: dict[str, JsonValue] = {"error": {"class": error_class.value, "desc": desc}}
    if id_:
        message["id"] = id_[0]
    return encode_message(message)


# -- framing: a streaming JSON value splitter ------------------------------------------

_WS = b" \t\r\n"
# Bytes that can never appear in valid input: ASCII controls other than whitespace, and
# bytes that never occur in UTF-8. Spec: qmp-spec.rst "Forcing the JSON parser into
# known-good state" — a control character or 0xFF resets the parser.
_INVALID = frozenset([*(set(range(0x20)) - set(_WS)), 0xC0, 0xC1, *range(0xF5, 0x100)])
_INVALID_CLASS = b"\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\xc0\\xc1\\xf5-\\xff"
# Where a fast scan must stop: inside a "..." string, inside a '...' string, between tokens
# of a nested value, inside a bare top-level token.
_STOP_DQ = re.compile(b'[\\\\"' + _INVALID_CLASS + b"]")
_STOP_SQ = re.compile(b"[\\\\\"'" + _INVALID_CLASS + b"]")
_STOP_NESTED = re.compile(b"[{}\\[\\]\"'" + _INVALID_CLASS + b"]")
_STOP_BARE = re.compile(b"[ \\t\\r\\n{}\\[\\],:\"'" + _INVALID_CLASS + b"]")

_DQ, _SQ, _BACKSLASH = 0x22, 0x27, 0x5C
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid literal {name}")


class JsonSplitter:
    """Cuts a byte stream into complete top-level JSON values, with bounded memory.

    Spec: qmp-spec.rst — input is UTF-8 JSON; the server also accepts ``'single-quoted'``
    strings and the escape ``\\'`` in both string forms (they are rewritten here into plain
    JSON). Framing is by value boundaries (brace depth outside strings), not lines.

    ``feed(data)`` returns a list of items, each either ``bytes`` (one complete value,
    rewritten to standard JSON, not yet parsed) or ``str`` (a parse-error description to
    report). Feeding a stream whole or byte by byte gives the same items.
    """

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_nesting: int = MAX_NESTING) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_nesting = max_nesting
        self._reset()
        self._garbage = False      # inside a run of invalid bytes (one error per run)

    def _reset(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._quote: int | None = None
        self._escape = False
        self._bare = False
        self._discard = False      # an over-limit value: track its end, keep nothing

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def _append(self, chunk: bytes | bytearray | memoryview, out: list) -> None:
        if self._discard:
            return
        self._buf += chunk
        if len(self._buf) > self.max_message_bytes:
            out.append(f"JSON parse error, message exceeds {self.max_message_bytes} bytes")
            self._buf = bytearray()
            self._discard = True

    def _finish(self, out: list) -> None:
        if not self._discard:
            out.append(bytes(self._buf))
        self._reset()

    def feed(self, data: bytes) -> list[bytes | str]:
        out: list[bytes | str] = []
        i, n = 0, len(data)
        while i < n:
            c = data[i]
            if c in _INVALID:
                if not self._garbage:
                    out.append(f"JSON parse error, invalid byte 0x{c:02x} in input")
                self._garbage = True
                self._reset()
                i += 1
                continue
            self._garbage = False
            if self._quote is not None:
                i = self._in_string(data, i, out)
            elif self._bare:
                i = self._in_bare(data, i, out)
            elif self._depth == 0:
                i = self._top_level(data, i, out)
            else:
                i = self._nested(data, i, out)
        return out

    def _in_string(self, data: bytes, i: int, out: list) -> int:
        if self._escape:
            self._escape = False
            # "\'" means a single quote in either string form; other escapes pass through.
            self._append(b"'" if data[i] == _SQ else b"\\" + data[i:i + 1], out)
            return i + 1
        stop = (_STOP_DQ if self._quote == _DQ else _STOP_SQ).search(data, i)
        j = stop.start() if stop else len(data)
        if j > i:
            self._append(data[i:j], out)
        if stop is None or data[j] in _INVALID:
            return j                         # feed() reports an invalid byte
        c = data[j]
        if c == _BACKSLASH:
            self._escape = True
        elif c == self._quote:
            self._append(b'"', out)
            self._quote = None
            if self._depth == 0:
                self._finish(out)
        else:                                # a raw '"' inside a '...' string
            self._append(b'\\"', out)
        return j + 1

    def _in_bare(self, data: bytes, i: int, out: list) -> int:
        stop = _STOP_BARE.search(data, i)
        j = stop.start() if stop else len(data)
        self._append(data[i:j], out)
        if stop is not None and data[j] not in _INVALID:
            self._finish(out)                # the delimiter is scanned on its own
        return j

    def _top_level(self, data: bytes, i: int, out: list) -> int:
        c = data[i]
        if c in _WS:
            return i + 1
        if c in _OPEN:
            self._depth = 1
            self._append(data[i:i + 1], out)
        elif c in (_DQ, _SQ):
            self._quote = c
            self._append(b'"', out)
        elif c in _CLOSE or c in b",:":
            out.append(f"JSON parse error, stray '{chr(c)}'")
        else:
            self._bare = True                # a number or literal: scanned by _in_bare
            return i
        return i + 1

    def _nested(self, data: bytes, i: int, out: list) -> int:
        stop = _STOP_NESTED.search(data, i)
        j = stop.start() if stop else len(data)
        if j > i:
            self._append(data[i:j], out)
        if stop is None or data[j] in _INVALID:
            return j
        c = data[j]
        if c in _OPEN:
            self._depth += 1
            if self._depth > self.max_nesting and not self._discard:
                out.append(f"JSON parse error, nesting exceeds {self.max_nesting} levels")
                self._buf = bytearray()
                self._discard = True
            self._append(data[j:j + 1], out)
        elif c in _CLOSE:
            self._depth -= 1
            self._append(data[j:j + 1], out)
            if self._depth == 0:
                self._finish(out)
        else:                                # a quote opens a string
            self._quote = c
            self._append(b'"', out)
        return j + 1


def parse_value(raw: bytes) -> JsonValue:
    """Decode one framed value; raises ``ValueError`` with QEMU-style wording."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"JSON parse error, invalid UTF-8 sequence at offset {exc.start}")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        msg = exc.msg[:1].lower() + exc.msg[1:]
        raise ValueError(f"JSON parse error, {msg}") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"JSON parse error, {exc}") from None


# -- the per-client protocol ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerVersion:
    """The greeting's and ``query-version``'s version object. Spec: qmp-spec.rst "Server
    Greeting" ("the format is the same as for the query-version command")."""

    major: int = 0
    minor: int = 1
    micro: int = 0
    package: str = "vmchannel 0.1.0"

    def to_json(self) -> dict[str, JsonValue]:
        return {"qemu": {"micro": self.micro, "minor": self.minor, "major": self.major},
                "package": self.package}


class QmpServerProtocol:
    """One client's QMP session: greeting, negotiation, commands, events.

    Spec: qmp-spec.rst "Capabilities Negotiation" — "In this mode only the
    ``qmp_capabilities`` command is allowed to run; all other commands will return the
    ``CommandNotFound`` error. Asynchronous messages are not delivered either."

    ``quit_allowed``: when True, the built-in ``quit`` is offered; executing it answers
    ``{"return": {}}``, moves to ``QmpState.QUIT`` and sets ``quit_requested``; the owner
    (the adapter) flushes the answer and then asks its own owner to stop. When False,
    ``quit`` is an unknown command, so a client cannot end the daemon.
    """

    CAPABILITIES: ClassVar[tuple[str, ...]] = ()   # "oob" deliberately not offered

    def __init__(self, registry: CommandRegistry, *, version: ServerVersion = ServerVersion(),
                 quit_allowed: bool = False, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_nesting: int = MAX_NESTING, logger: logging.Logger = log) -> None:
        self._registry = registry
        self._version = version
        self._quit_allowed = quit_allowed
        self._splitter = JsonSplitter(max_message_bytes=max_message_bytes,
                                      max_nesting=max_nesting)
        self._log = logger
        self.state = QmpState.NEGOTIATION

    @property
    def accepts_events(self) -> bool:
        return self.state is QmpState.COMMAND

    @property
    def quit_requested(self) -> bool:
        return self.state is QmpState.QUIT

    def greeting(self) -> bytes:
        """The first message. Spec: qmp-spec.rst "Server Greeting"."""
        return encode_message({"QMP": {"version": self._version.to_json(),
                                       "capabilities": list(self.CAPABILITIES)}})

    def event(self, encoded_event: bytes) -> bytes:
        """The bytes to send this client for an event made by ``encode_event``."""
        return encoded_event if self.accepts_events else b""

    def receive(self, data: bytes) -> bytes:
        """Feed bytes read from the client (``b""`` = EOF); return the bytes to send."""
        if self.state in (QmpState.QUIT, QmpState.CLOSED):
            return b""
        if not data:
            self.state = QmpState.CLOSED
            return b""
        replies = []
        for item in self._splitter.feed(data):
            if self.state is QmpState.QUIT:
                break                        # nothing runs after quit
            if isinstance(item, str):
                self._log.debug("<-- (unparsable) %s", item)
                replies.append(_error(ErrorClass.GenericError, item))
                continue
            self._log.debug("<-- %s", item)
            replies.append(self._handle(item))
        reply = b"".join(replies)
        if reply:
            self._log.debug("--> %s", reply)
        return reply

    # -- one request ----------------------------------------------------------------
    def _handle(self, raw: bytes) -> bytes:
        try:
            request = parse_value(raw)
        except ValueError as exc:
            return _error(ErrorClass.GenericError, str(exc))
        if not isinstance(request, dict):
            return _error(ErrorClass.GenericError, "QMP input must be a JSON object")
        id_ = (request["id"],) if "id" in request else ()
        try:
            result = self._dispatch(request)
        except QmpCommandError as exc:
            return encode_message({"error": exc.to_json(), **({"id": id_[0]} if id_ else {})})
        message: dict[str, JsonValue] = {"return": result}
        if id_:
            message["id"] = id_[0]
        try:
            return encode_message(message)
        except (TypeError, ValueError) as exc:
            self._log.error("command %r returned a value JSON cannot encode: %s",
                            request.get("execute"), exc)
            return _error(ErrorClass.GenericError,
                          f"internal error: the result of {request.get('execute')} "
                          "is not JSON", id_)

    def _check_request(self, request: dict[str, JsonValue]) -> str:
        """Spec: qmp-spec.rst "Issuing Commands"; members checked as QEMU's
        ``qmp_dispatch_check_obj`` with OOB not negotiated (so ``exec-oob`` is unexpected)."""
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise QmpCommandError(ErrorClass.GenericError,
                                          "QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpCommandError(ErrorClass.GenericError,
                                          "QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpCommandError(ErrorClass.GenericError,
                                      f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise QmpCommandError(ErrorClass.GenericError, "QMP input lacks member 'execute'")
        return request["execute"]

    def _dispatch(self, request: dict[str, JsonValue]) -> JsonValue:
        name = self._check_request(request)
        arguments = request.get("arguments", {})
        if self.state is QmpState.NEGOTIATION and name != "qmp_capabilities":
            raise QmpCommandError(ErrorClass.CommandNotFound,
                                  "Expecting capabilities negotiation with 'qmp_capabilities'")
        builtin = self._builtin(name)
        if builtin is not None:
            return builtin(arguments)
        command = self._registry.get(name)
        if command is None:
            raise QmpCommandError(ErrorClass.CommandNotFound,
                                  f"The command {name} has not been found")
        validated = command.validate(arguments)
        try:
            result = command.handler(validated)
        except QmpCommandError:
            raise
        except Exception as exc:   # a failing handler answers an error; the server goes on
            self._log.error("QMP command %s failed: %s: %s", name, type(exc).__name__, exc)
            self._log.debug("traceback of QMP command %s", name, exc_info=True)
            raise QmpCommandError(ErrorClass.GenericError,
                                  f"internal error in {name}: {type(exc).__name__}") from exc
        return {} if result is None else result

    # -- built-in commands ----------------------------------------------------------
    def _builtin(self, name: str) -> Callable[[dict[str, JsonValue]], JsonValue] | None:
        return {
            "qmp_capabilities": self._qmp_capabilities,
            "query-commands": self._query_commands,
            "query-version": self._query_version,
            "quit": self._quit if self._quit_allowed else None,
        }.get(name)

    _CAPS_COMMAND = Command("qmp_capabilities", lambda a: None,
                            (ArgSpec("enable", ArgType.ARRAY, True),))
    _NO_ARGS = Command("-", lambda a: None, ())

    def _qmp_capabilities(self, arguments: dict[str, JsonValue]) -> JsonValue:
        """Spec: qmp-spec.rst "Capabilities Negotiation"."""
        if self.state is QmpState.COMMAND:
            raise QmpCommandError(ErrorClass.CommandNotFound,
                                  "Capabilities negotiation is already complete, "
                                  "command ignored")
        self._CAPS_COMMAND.validate(arguments)
        for cap in arguments.get("enable", []):
            if not isinstance(cap, str):
                raise QmpCommandError(ErrorClass.GenericError,
                                      "Invalid parameter type for 'enable', expected: string")
            if cap not in self.CAPABILITIES:
                raise QmpCommandError(ErrorClass.GenericError,
                                      f"Capability '{cap}' not available")
        self.state = QmpState.COMMAND
        return {}

    def _query_commands(self, arguments: dict[str, JsonValue]) -> JsonValue:
        self._NO_ARGS.validate(arguments)
        names = [n for n in BUILTIN_COMMANDS if self._builtin(n) is not None]
        return [{"name": n} for n in names + self._registry.names()]

    def _query_version(self, arguments: dict[str, JsonValue]) -> JsonValue:
        self._NO_ARGS.validate(arguments)
        return self._version.to_json()

    def _quit(self, arguments: dict[str, JsonValue]) -> JsonValue:
        self._NO_ARGS.validate(arguments)
        self.state = QmpState.QUIT
        return {}
