"""The daemon raises its soft open-file limit before it starts (virtio.cli.raise_fd_limit):
a console with 127 ports needs more fds than the common default soft limit of 1,024, and a
front-end message whose fds cannot be received ends that front-end's connection.

Spec: vhost-user "Communication" (fds travel as SCM_RIGHTS ancillary data); virtio 1.2 §5.3.
"""

from __future__ import annotations

import pathlib
import resource
import subprocess
import sys

import pytest

from virtio.cli import raise_fd_limit

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_limit():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_a_low_soft_limit_is_raised_to_the_wanted_one(restore_limit):
    _, hard = restore_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    assert raise_fd_limit(want) == want
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (want, hard)


def test_never_above_the_hard_limit():
    # In a child: lowering the hard limit cannot be undone without privilege.
    code = ("import resource; from virtio.cli import raise_fd_limit; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048)); "
            "print(raise_fd_limit(5000), resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.split() == ["2048", "(2048,", "2048)"]


def test_a_higher_soft_limit_is_left_alone(restore_limit):
    soft, hard = restore_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(3000, hard), hard))
    assert raise_fd_limit(2000) == min(3000, hard)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(3000, hard)
