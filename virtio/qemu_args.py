"""The QEMU command-line arguments that attach a vmchannel configuration.

vhost-user needs guest RAM shared through a file descriptor, so every configuration starts
with a memfd memory backend (``share=on``) made the machine's RAM. Then, per device:

- console: QEMU >= 10.2's generic ``vhost-user-test-device-pci`` with ``virtio-id=3``
  (virtio 1.2 §5.3), ``num_vqs = 2 * (max_nr_ports + 1)`` and ``config_size=12``
  (cols, rows, max_nr_ports, emerg_wr: virtio 1.2 §5.3.4);
- vsock: ``vhost-user-vsock-pci`` (QEMU >= 5.1), which reads the guest CID from the back-end
  with VHOST_USER_GET_CONFIG.

A device whose back-end listens (the default) gets a plain ``-chardev socket,path=...``
(QEMU connects); one whose back-end connects gets ``server=on,wait=off`` (QEMU listens and
our back-end connects to it).
"""

from __future__ import annotations

from virtio.config import Config, VsockConfig

CONSOLE_CONFIG_SIZE = 12
VIRTIO_ID_CONSOLE = 3


def _chardev(chardev_id: str, path: str, backend_mode: str) -> str:
    spec = f"socket,id={chardev_id},path={path}"
    if backend_mode == "connect":
        spec += ",server=on,wait=off"
    return spec


def _memory_args(memory: str) -> list[str]:
    return [
        "-object", f"memory-backend-memfd,id=vmchannel-mem,size={memory},share=on",
        "-machine", "memory-backend=vmchannel-mem",
        "-m", memory,
    ]


def console_args(config: Config) -> list[str]:
    args: list[str] = []
    for n, console in enumerate(config.consoles):
        chardev = f"vmchannel-console{n}"
        args += ["-chardev", _chardev(chardev, console.socket, console.mode)]
        args += [
            "-device",
            f"vhost-user-test-device-pci,chardev={chardev},virtio-id={VIRTIO_ID_CONSOLE},"
            f"num_vqs={console.num_queues},config_size={CONSOLE_CONFIG_SIZE}",
        ]
    return args


def vsock_args(vm: VsockConfig) -> list[str]:
    chardev = f"vmchannel-vsock{vm.guest_cid}"
    return ["-chardev", _chardev(chardev, vm.socket, vm.mode),
            "-device", f"vhost-user-vsock-pci,chardev={chardev}"]


def qemu_arg_sets(config: Config, memory: str = "1G") -> list[list[str]]:
    """One argument list per QEMU process. A vsock device belongs to one VM (its CID), so a
    configuration with several vsock VMs needs several QEMUs; the console devices are put on
    the first one."""
    vms = list(config.vsocks) or [None]
    sets = []
    for n, vm in enumerate(vms):
        args = _memory_args(memory)
        if n == 0:
            args += console_args(config)
        if vm is not None:
            args += vsock_args(vm)
        sets.append(args)
    return sets
