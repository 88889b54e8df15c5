"""Every ``virtio 1.2 §N`` cited in the code names a section that exists in virtio 1.2
(STYLE R6: check every spec section number you cite against the spec text).

``docs/virtio-1.2-sections.txt`` lists the section numbers of the v1.2-cs01 text, including
the numbered Device/Driver Requirements subsections.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
CITATION = re.compile(r"virtio 1\.2 §(\d+(?:\.\d+)*)(?:[–-]§?(\d+(?:\.\d+)*))?")
SOURCES = ("ring", "vhost_user", "virtio", "csrc", "tests", "bench", "docs")


def known_sections() -> set[str]:
    lines = (ROOT / "docs/virtio-1.2-sections.txt").read_text().splitlines()
    return {line.strip() for line in lines if line and not line.startswith("#")}


def test_every_cited_virtio_1_2_section_exists():
    known = known_sections()
    assert "5.10.6.3" in known and "2.7.7.2" in known  # the list itself is sane
    unknown = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".c", ".h", ".md") or ".cache" in path.parts:
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for match in CITATION.finditer(line):
                    for section in filter(None, match.groups()):
                        if section not in known:
                            unknown.append(f"{path.relative_to(ROOT)}:{n}: §{section}")
    assert not unknown, "citations of sections virtio 1.2 does not have:\n" + "\n".join(unknown)
