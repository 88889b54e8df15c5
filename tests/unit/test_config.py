"""Configuration: CLI specs, TOML files, validation errors, QEMU arguments."""

import pytest

from virtio.cli import build_parser, config_from_args
from virtio.config import (
    Config,
    ConfigError,
    ConsoleConfig,
    Endpoint,
    MAX_CONSOLE_PORTS,
    PortConfig,
    VsockConfig,
    default_config,
    load_toml,
)
from virtio.qemu_args import qemu_arg_sets


def test_port_spec_with_and_without_endpoint():
    assert PortConfig.parse("org.qemu.guest_agent.0") == PortConfig("org.qemu.guest_agent.0")
    port = PortConfig.parse("a=connect:/run/svc.sock")
    assert port.host == Endpoint("connect", "/run/svc.sock")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 251, "sp ace"])
def test_port_names_that_could_escape_or_confuse_are_refused(name):
    with pytest.raises(ConfigError, match="not a valid port name"):
        PortConfig.parse(name)


@pytest.mark.parametrize("spec", ["listen", "tcp:1.2.3.4", "listen:", "bogus"])
def test_bad_endpoint_spec_is_refused_with_the_expected_forms(spec):
    with pytest.raises(ConfigError, match="listen:PATH"):
        Endpoint.parse(spec)


def test_max_ports_limit_follows_the_8_bit_vhost_user_ring_index():
    assert ConsoleConfig(socket="s", max_ports=MAX_CONSOLE_PORTS).num_queues == 256
    with pytest.raises(ConfigError, match="out of range"):
        ConsoleConfig(socket="s", max_ports=MAX_CONSOLE_PORTS + 1)
    with pytest.raises(ConfigError, match="out of range"):
        ConsoleConfig(socket="s", max_ports=0)


def test_ports_without_endpoint_need_a_socket_dir():
    with pytest.raises(ConfigError, match="no host endpoint"):
        ConsoleConfig(socket="s", ports=(PortConfig("a"),))
    cfg = ConsoleConfig(socket="s", socket_dir="/d", ports=(PortConfig("a"),))
    assert cfg.endpoint_for(cfg.ports[0]) == Endpoint("listen", "/d/a.sock")


def test_duplicate_port_names_and_cids_are_refused():
    with pytest.raises(ConfigError, match="duplicate port names"):
        ConsoleConfig(socket="s", socket_dir="/d", ports=(PortConfig("a"), PortConfig("a")))
    vm = VsockConfig(guest_cid=3, socket="v", uds_path="u")
    with pytest.raises(ConfigError, match="duplicate guest CIDs"):
        Config(vsocks=(vm, VsockConfig(guest_cid=3, socket="w", uds_path="x")))


def test_vm_spec_like_vhost_device_vsock():
    vm = VsockConfig.parse_vm("guest-cid=4,socket=/tmp/v4.sock,uds-path=/tmp/v4,groups=a+b")
    assert (vm.guest_cid, vm.socket, vm.uds_path, vm.groups) == (4, "/tmp/v4.sock", "/tmp/v4", ("a", "b"))
    with pytest.raises(ConfigError, match="uds-path is required"):
        VsockConfig.parse_vm("guest-cid=4,socket=/tmp/v4.sock")
    with pytest.raises(ConfigError, match="unknown settings: colour"):
        VsockConfig.parse_vm("guest-cid=4,socket=s,uds-path=u,colour=red")


def test_toml_with_several_devices(tmp_path):
    path = tmp_path / "vmchannel.toml"
    path.write_text(
        """
[management]
socket = "/run/m.sock"

[[console]]
socket = "/run/c0.sock"
max_ports = 4
socket_dir = "/run/ports"
console = "stdio"
  [[console.port]]
  name = "org.qemu.guest_agent.0"
  [[console.port]]
  name = "svc"
  host = "connect:/run/svc.sock"

[[vsock]]
guest_cid = 3
socket = "/run/v3.sock"
uds_path = "/run/v3"

[[vsock]]
guest_cid = 4
socket = "/run/v4.sock"
uds_path = "/run/v4"
"""
    )
    cfg = load_toml(path)
    assert cfg.mgmt_socket == "/run/m.sock"
    (console,) = cfg.consoles
    assert console.console == Endpoint("stdio")
    assert [p.name for p in console.ports] == ["org.qemu.guest_agent.0", "svc"]
    assert [v.guest_cid for v in cfg.vsocks] == [3, 4]
    sets = qemu_arg_sets(cfg)
    assert len(sets) == 2  # two vsock VMs -> two QEMUs
    assert any("num_vqs=10" in a for a in sets[0])
    assert not any("vhost-user-test-device-pci" in a for a in sets[1])


def test_toml_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[console]]\nmax_ports = 3\n")
    with pytest.raises(ConfigError, match="socket is required"):
        load_toml(path)
    path.write_text("[frobnicate]\n")
    with pytest.raises(ConfigError, match="unknown sections: frobnicate"):
        load_toml(path)
    path.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(path)


def test_console_cli_flags():
    args = build_parser().parse_args(
        ["console", "--socket", "/tmp/c.sock", "--max-ports", "8", "--port", "a=listen:/tmp/a",
         "--port", "b", "--socket-dir", "/tmp/d"])
    cfg = config_from_args(args)
    (console,) = cfg.consoles
    assert console.max_ports == 8 and console.num_queues == 18
    assert console.endpoint_for(console.ports[1]) == Endpoint("listen", "/tmp/d/b.sock")
    assert console.zero_copy is True


def test_console_cli_no_zero_copy():
    args = build_parser().parse_args(["console", "--socket", "/tmp/c.sock", "--no-zero-copy"])
    (console,) = config_from_args(args).consoles
    assert console.zero_copy is False


def test_vsock_cli_flags_compatible_with_vhost_device_vsock():
    args = build_parser().parse_args(
        ["vsock", "--guest-cid", "3", "--socket", "/tmp/v.sock", "--uds-path", "/tmp/v",
         "--tx-buffer-size", "65536", "--queue-size", "512",
         "--vm", "guest-cid=5,socket=/tmp/v5.sock,uds-path=/tmp/v5"])
    cfg = config_from_args(args)
    assert [(v.guest_cid, v.tx_buffer_size, v.queue_size) for v in cfg.vsocks] == [
        (3, 65536, 512), (5, 256 * 1024, 256)]


def test_default_config_puts_everything_under_run_dir():
    cfg = default_config("/run/x")
    paths = [cfg.mgmt_socket, cfg.consoles[0].socket, cfg.vsocks[0].socket, cfg.vsocks[0].uds_path]
    assert all(p.startswith("/run/x/") for p in paths)
    memfd = qemu_arg_sets(cfg)[0][1]
    assert "memory-backend-memfd" in memfd and "share=on" in memfd


def test_port_id_0_is_reserved_for_the_console_port():
    three = tuple(PortConfig(n) for n in ("a", "b", "c"))
    with pytest.raises(ConfigError, match="leaves room for 2"):
        ConsoleConfig(socket="s", socket_dir="/d", max_ports=3, ports=three)
    ConsoleConfig(socket="s", socket_dir="/d", max_ports=4, ports=three)
    with pytest.raises(ConfigError, match="at most one console port"):
        ConsoleConfig(socket="s", socket_dir="/d", max_ports=4, console=Endpoint("stdio"),
                      ports=(PortConfig("a", console=True),))


def test_vsock_credit_request_delay_from_toml_cli_and_vm(tmp_path):
    """``credit_request_delay_s`` (TOML), ``--credit-request-delay`` (CLI) and
    ``credit-request-delay-s=`` (``--vm``) reach the connections' `ConnConfig`; out of range
    is refused. Spec: virtio 1.2 §5.10.6.3 (CREDIT_REQUEST)."""
    from virtio.vsock.device import conn_config_for

    path = tmp_path / "v.toml"
    path.write_text('[[vsock]]\nguest_cid = 3\nsocket = "/tmp/v.sock"\nuds_path = "/tmp/v"\n'
                    "credit_request_delay_s = 0.25\n")
    (vm,) = load_toml(path).vsocks
    assert conn_config_for(vm).credit_request_delay_s == 0.25
    args = build_parser().parse_args(
        ["vsock", "--guest-cid", "3", "--socket", "/tmp/v.sock", "--uds-path", "/tmp/v",
         "--credit-request-delay", "0", "--vm",
         "guest-cid=5,socket=/tmp/v5.sock,uds-path=/tmp/v5,credit-request-delay-s=0.5"])
    assert [conn_config_for(v).credit_request_delay_s
            for v in config_from_args(args).vsocks] == [0.0, 0.5]
    default = build_parser().parse_args(
        ["vsock", "--guest-cid", "3", "--socket", "/tmp/v.sock", "--uds-path", "/tmp/v"])
    assert config_from_args(default).vsocks[0].credit_request_delay_s == 0.01
    path.write_text('[[vsock]]\nguest_cid = 3\nsocket = "/tmp/v.sock"\nuds_path = "/tmp/v"\n'
                    "credit_request_delay_s = -1\n")
    with pytest.raises(ConfigError, match="credit_request_delay_s"):
        load_toml(path)


def test_vsock_stream_loop_after_from_toml_and_vm(tmp_path):
    """``stream_loop_after`` (TOML, ``--vm stream-loop-after=``): default 1 MiB, -1 turns the
    C stream loop off, below -1 is refused (virtio/vsock/stream_loop.py)."""
    path = tmp_path / "v.toml"
    base = '[[vsock]]\nguest_cid = 3\nsocket = "/tmp/v.sock"\nuds_path = "/tmp/v"\n'
    path.write_text(base)
    assert load_toml(path).vsocks[0].stream_loop_after == 1 << 20
    path.write_text(base + "stream_loop_after = -1\n")
    assert load_toml(path).vsocks[0].stream_loop_after == -1
    assert VsockConfig.parse_vm("guest-cid=5,socket=/s,uds-path=/u,stream-loop-after=0"
                                ).stream_loop_after == 0
    path.write_text(base + "stream_loop_after = -2\n")
    with pytest.raises(ConfigError, match="stream_loop_after"):
        load_toml(path)
