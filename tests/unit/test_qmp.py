"""Unit tests for the sans-I/O QMP server (virtio/qmp.py).

Spec: QEMU docs/interop/qmp-spec.rst.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.qmp import (
    ArgType,
    CommandRegistry,
    ErrorClass,
    JsonSplitter,
    QmpCommandError,
    QmpServerProtocol,
    QmpState,
    ServerVersion,
    encode_event,
)

CAPS = b'{"execute": "qmp_capabilities"}'


def make_registry() -> tuple[CommandRegistry, list]:
    calls: list = []
    registry = CommandRegistry()

    def echo(args):
        calls.append(args)
        return {"text": args["text"], "n": args.get("n")}

    def fail(args):
        raise QmpCommandError(ErrorClass.DeviceNotFound, f"no device {args['id']!r}")

    def crash(args):
        raise RuntimeError("boom")

    registry.register("echo", echo, args_schema={"text": "str", "*n": ArgType.INT})
    registry.register("fail", fail, args_schema={"id": "str"})
    registry.register("crash", crash)
    registry.register("nothing", lambda args: None)
    registry.register("typed", lambda args: args, args_schema={
        "s": "str", "i": "int", "f": "number", "b": "bool", "o": "object", "a": "array",
        "x": "any"})
    return registry, calls


def make_protocol(state: QmpState = QmpState.NEGOTIATION, **kw) -> QmpServerProtocol:
    registry = kw.pop("registry", None) or make_registry()[0]
    proto = QmpServerProtocol(registry, **kw)
    if state is QmpState.COMMAND:
        assert replies(proto.receive(CAPS)) == [{"return": {}}]
    return proto


def replies(data: bytes) -> list[dict]:
    assert data == b"" or data.endswith(b"\r\n")
    data.decode("ascii")  # the server sends ASCII only
    return [json.loads(line) for line in data.split(b"\r\n") if line]


def run(proto: QmpServerProtocol, data: bytes) -> list[dict]:
    return replies(proto.receive(data))


# -- greeting and negotiation -----------------------------------------------------------

def test_greeting_has_version_and_no_capabilities():
    proto = make_protocol()
    (greeting,) = replies(proto.greeting())
    assert greeting == {"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0},
                                            "package": "vmchannel 0.1.0"},
                                "capabilities": []}}


def test_negotiation_mode_refuses_other_commands_with_command_not_found():
    proto = make_protocol()
    (reply,) = run(proto, b'{"execute": "echo", "arguments": {"text": "x"}, "id": 7}')
    assert reply == {"error": {"class": "CommandNotFound", "desc":
                               "Expecting capabilities negotiation with 'qmp_capabilities'"},
                     "id": 7}
    assert proto.state is QmpState.NEGOTIATION


def test_capabilities_then_commands_run():
    proto = make_protocol()
    assert run(proto, CAPS + b'{"execute": "echo", "arguments": {"text": "x"}, "id": "a"}') == [
        {"return": {}}, {"return": {"text": "x", "n": None}, "id": "a"}]
    assert proto.state is QmpState.COMMAND


def test_capabilities_twice_is_command_not_found():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, CAPS)
    assert reply["error"]["class"] == "CommandNotFound"
    assert "already complete" in reply["error"]["desc"]


def test_capabilities_refuses_oob_which_is_not_offered():
    proto = make_protocol()
    (reply,) = run(proto, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert reply == {"error": {"class": "GenericError",
                               "desc": "Capability 'oob' not available"}}
    assert proto.state is QmpState.NEGOTIATION


def test_exec_oob_is_rejected_as_unexpected_member():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, b'{"exec-oob": "echo", "id": 3}')
    assert reply == {"error": {"class": "GenericError",
                               "desc": "QMP input member 'exec-oob' is unexpected"}, "id": 3}


# -- events -------------------------------------------------------------------------------

def test_events_only_after_capabilities():
    proto = make_protocol()
    event = encode_event("PORT_OPEN", {"port": "p1"}, 1700000000.25)
    assert proto.event(event) == b""
    run(proto, CAPS)
    (message,) = replies(proto.event(event))
    assert message == {"event": "PORT_OPEN", "data": {"port": "p1"},
                       "timestamp": {"seconds": 1700000000, "microseconds": 250000}}


def test_event_without_data_or_time():
    (message,) = replies(encode_event("RESET", None, None))
    assert message == {"event": "RESET", "timestamp": {"seconds": -1, "microseconds": -1}}


# -- built-ins --------------------------------------------------------------------------

def test_query_commands_lists_builtins_and_registered():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, b'{"execute": "query-commands"}')
    names = [c["name"] for c in reply["return"]]
    assert names[:3] == ["qmp_capabilities", "query-commands", "query-version"]
    assert set(names[3:]) == {"echo", "fail", "crash", "nothing", "typed"}
    assert "quit" not in names


def test_query_version_matches_greeting():
    proto = make_protocol(QmpState.COMMAND, version=ServerVersion(1, 2, 3, "pkg"))
    (reply,) = run(proto, b'{"execute": "query-version"}')
    assert reply["return"] == json.loads(proto.greeting())["QMP"]["version"]
    assert reply["return"]["qemu"] == {"major": 1, "minor": 2, "micro": 3}


def test_quit_is_unknown_unless_allowed():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, b'{"execute": "quit"}')
    assert reply["error"]["class"] == "CommandNotFound"
    assert not proto.quit_requested


def test_quit_when_allowed_answers_then_ignores_input():
    proto = make_protocol(QmpState.COMMAND, quit_allowed=True)
    data = b'{"execute": "quit", "id": 1}{"execute": "echo", "arguments": {"text": "late"}}'
    assert run(proto, data) == [{"return": {}, "id": 1}]
    assert proto.quit_requested
    assert proto.receive(b'{"execute": "query-version"}') == b""


# -- request shape errors (QEMU qmp_dispatch_check_obj wording) ------------------------

@pytest.mark.parametrize("data, desc", [
    (b"[1, 2]", "QMP input must be a JSON object"),
    (b'"str"', "QMP input must be a JSON object"),
    (b"42 ", "QMP input must be a JSON object"),
    (b"{}", "QMP input lacks member 'execute'"),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "echo", "arguments": []}', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "echo", "extra": 1}', "QMP input member 'extra' is unexpected"),
])
def test_malformed_requests_get_generic_error(data, desc):
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, data)
    assert reply["error"] == {"class": "GenericError", "desc": desc}


def test_unknown_command_is_command_not_found_with_id():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, b'{"execute": "no-such", "id": {"any": ["json"]}}')
    assert reply == {"error": {"class": "CommandNotFound",
                               "desc": "The command no-such has not been found"},
                     "id": {"any": ["json"]}}


# -- JSON syntax errors, recovery -----------------------------------------------------------

def test_spec_example_parse_error_then_recovers():
    proto = make_protocol(QmpState.COMMAND)
    assert run(proto, b'{ "execute": }\n{"execute": "nothing"}') == [
        {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}},
        {"return": {}}]


@pytest.mark.parametrize("garbage", [b"}", b"]", b",", b"nul ", b"\x01", b"\xff", b"NaN "])
def test_garbage_gets_one_error_and_server_keeps_serving(garbage):
    proto = make_protocol(QmpState.COMMAND)
    out = run(proto, garbage + b'{"execute": "nothing", "id": 1}')
    assert len(out) == 2
    assert out[0]["error"]["class"] == "GenericError"
    assert out[0]["error"]["desc"].startswith("JSON parse error")
    assert out[1] == {"return": {}, "id": 1}


def test_spec_control_character_resets_half_read_input():
    """Spec: qmp-spec.rst "Forcing the JSON parser into known-good state"."""
    proto = make_protocol(QmpState.COMMAND)
    assert run(proto, b'{"execute": "echo", "argu') == []
    out = run(proto, b'\x1b{"execute": "nothing"}')
    assert out[0]["error"]["desc"] == "JSON parse error, invalid byte 0x1b in input"
    assert out[1:] == [{"return": {}}]


def test_invalid_utf8_inside_string_is_a_parse_error():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, b'{"execute": "echo", "arguments": {"text": "\xe9t\xe9"}}')
    assert reply["error"]["desc"].startswith("JSON parse error, invalid UTF-8")


def test_utf8_input_ascii_output():
    proto = make_protocol(QmpState.COMMAND)
    data = '{"execute": "echo", "arguments": {"text": "été ✓"}}'.encode()
    out = proto.receive(data)
    assert out.isascii()
    assert replies(out)[0]["return"]["text"] == "été ✓"


def test_single_quoted_strings_and_escaped_quote_are_accepted():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, b"{'execute': 'echo', 'arguments': {'text': 'it\\'s \"x\" \\u00e9'}}")
    assert reply == {"return": {"text": "it's \"x\" \u00e9", "n": None}}


def test_braces_inside_strings_do_not_frame():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, b'{"execute": "echo", "arguments": {"text": "}{\\"}"}}')
    assert reply["return"]["text"] == '}{"}'


def test_message_over_limit_gets_one_error_and_is_skipped():
    proto = make_protocol(QmpState.COMMAND, max_message_bytes=1024)
    big = b'{"execute": "echo", "arguments": {"text": "' + b"{[" * 2000 + b'"}}'
    out = run(proto, big + b'{"execute": "nothing"}')
    assert out == [{"error": {"class": "GenericError",
                              "desc": "JSON parse error, message exceeds 1024 bytes"}},
                   {"return": {}}]
    assert proto._splitter.buffered_bytes == 0


def test_default_limit_is_one_mebibyte():
    proto = make_protocol(QmpState.COMMAND)
    ok = b'{"execute": "echo", "arguments": {"text": "' + b"a" * ((1 << 20) - 100) + b'"}}'
    assert run(proto, ok)[0]["return"]["text"] == "a" * ((1 << 20) - 100)
    too_big = ok.replace(b"aaaa", b"aaaaa", 100)
    assert run(proto, too_big)[0]["error"]["desc"] == \
        "JSON parse error, message exceeds 1048576 bytes"


def test_nesting_over_limit_is_refused_without_recursion_error():
    proto = make_protocol(QmpState.COMMAND)
    deep = b'{"execute": "echo", "arguments": {"text": "x", "n": ' + b"[" * 5000 + b"]" * 5000
    out = run(proto, deep + b"}}" + b'{"execute": "nothing"}')
    assert out[0]["error"]["desc"] == "JSON parse error, nesting exceeds 64 levels"
    assert out[1:] == [{"return": {}}]


# -- argument validation and handler errors ---------------------------------------------------

@pytest.mark.parametrize("arguments, desc", [
    ({}, "Parameter 'text' is missing"),
    ({"n": 1}, "Parameter 'text' is missing"),
    ({"text": 1}, "Invalid parameter type for 'text', expected: string"),
    ({"text": "x", "n": "1"}, "Invalid parameter type for 'n', expected: integer"),
    ({"text": "x", "n": True}, "Invalid parameter type for 'n', expected: integer"),
    ({"text": "x", "n": 1.5}, "Invalid parameter type for 'n', expected: integer"),
    ({"text": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
])
def test_bad_arguments_name_the_argument_and_skip_the_handler(arguments, desc):
    registry, calls = make_registry()
    proto = make_protocol(QmpState.COMMAND, registry=registry)
    request = json.dumps({"execute": "echo", "arguments": arguments, "id": 9}).encode()
    (reply,) = run(proto, request)
    assert reply == {"error": {"class": "GenericError", "desc": desc}, "id": 9}
    assert calls == []


def test_every_argument_type_accepts_its_json_type():
    proto = make_protocol(QmpState.COMMAND)
    args = {"s": "s", "i": -3, "f": 2.5, "b": False, "o": {"k": 1}, "a": [1], "x": None}
    (reply,) = run(proto, json.dumps({"execute": "typed", "arguments": args}).encode())
    assert reply == {"return": args}


def test_handler_error_class_and_desc_reach_the_client():
    proto = make_protocol(QmpState.COMMAND)
    (reply,) = run(proto, b'{"execute": "fail", "arguments": {"id": "dev0"}, "id": 1}')
    assert reply == {"error": {"class": "DeviceNotFound", "desc": "no device 'dev0'"}, "id": 1}


def test_handler_crash_is_generic_error_and_server_survives(caplog):
    proto = make_protocol(QmpState.COMMAND)
    out = run(proto, b'{"execute": "crash"}{"execute": "nothing"}')
    assert out[0]["error"]["class"] == "GenericError"
    assert "RuntimeError" in out[0]["error"]["desc"]
    assert out[1] == {"return": {}}
    assert any("crash" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_handler_returning_non_json_is_generic_error():
    registry = CommandRegistry()
    registry.register("bad", lambda args: {"x": object()})
    proto = make_protocol(QmpState.COMMAND, registry=registry)
    (reply,) = run(proto, b'{"execute": "bad", "id": 2}')
    assert reply["error"]["class"] == "GenericError" and reply["id"] == 2


def test_registry_refuses_builtin_duplicate_and_bad_names():
    registry = CommandRegistry()
    registry.register("x-ok_name.1", lambda a: None)
    for name in ("qmp_capabilities", "quit", "x-ok_name.1", "", "bad name", "-x"):
        with pytest.raises(ValueError):
            registry.register(name, lambda a: None)
    with pytest.raises(ValueError):
        registry.register("y", lambda a: None, args_schema={"a": "no-such-type"})
    with pytest.raises(ValueError):
        registry.register("z", lambda a: None, args_schema={"a": "str", "*a": "int"})
    registry.unregister("x-ok_name.1")
    assert "x-ok_name.1" not in registry


def test_qmp_command_error_refuses_unknown_class():
    with pytest.raises(ValueError):
        QmpCommandError("NoSuchClass", "x")


def test_eof_closes():
    proto = make_protocol(QmpState.COMMAND)
    assert proto.receive(b"") == b""
    assert proto.state is QmpState.CLOSED


# -- framing: whole vs byte-at-a-time -------------------------------------------------------

SESSION = (
    b'{"execute": "echo", "arguments": {"text": "early"}}\n'
    + CAPS
    + b'  {"execute": "echo", "arguments": {"text": "a\\"}{b", "n": 2}, "id": [1]}\r\n'
    + b"{'execute': 'echo', 'arguments': {'text': 'sq\\'\"'}}"
    + b'} ] 42 "top" [1,2]{"execute":}\x00\x00{"execute": "fail", "arguments": {"id": "d"}}'
    + b'{"execute": "typed"} {"execute": "crash"}\xff{"execute": "no-such"} true'
    + b'{"execute": "echo", "arguments": {"text": "' + b"z" * 3000 + b'"}}'
    + b'{"execute": "query-commands", "id": "last"}'
)


def feed_in_chunks(data: bytes, sizes) -> bytes:
    proto = make_protocol(max_message_bytes=2048)
    out, i = [], 0
    for size in sizes:
        if i >= len(data):
            break
        out.append(proto.receive(data[i:i + size]))
        i += size
    out.append(proto.receive(data[i:]))
    return b"".join(out)


def test_whole_and_byte_at_a_time_give_identical_output():
    whole = feed_in_chunks(SESSION, [])
    bytewise = feed_in_chunks(SESSION, [1] * len(SESSION))
    assert whole == bytewise
    out = replies(whole)
    assert out[0]["error"]["class"] == "CommandNotFound"
    assert out[1] == {"return": {}}
    assert out[2] == {"return": {"text": 'a"}{b', "n": 2}, "id": [1]}
    assert out[-1]["id"] == "last"
    assert sum("message exceeds 2048" in m.get("error", {}).get("desc", "") for m in out) == 1


@settings(deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), max_size=200))
def test_any_chunking_gives_identical_output(sizes):
    assert feed_in_chunks(SESSION, sizes) == feed_in_chunks(SESSION, [])


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=300))  # b"" is EOF
def test_arbitrary_bytes_only_produce_error_replies(data):
    proto = make_protocol(QmpState.COMMAND)
    out = proto.receive(data)
    for reply in replies(out):
        assert set(reply) <= {"error", "return", "id"}
    assert run(proto, b'\x01{"execute": "nothing", "id": "sync"}')[-1] == \
        {"return": {}, "id": "sync"}


def test_splitter_reports_items_in_order():
    splitter = JsonSplitter()
    assert splitter.feed(b'{"a": 1} [2] "s" 7 ') == [b'{"a": 1}', b"[2]", b'"s"', b"7"]
