"""``--add SRC:DEST``: local files laid on top of the image as a final, planned layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.package.helpers import build, debugfs, fsck, make_plan
from tests.support.imagebuilder import directory, file, symlink
from worker.errors import ConfigError, UnsafeLayerEntry
from worker.export import AddSpec
from worker.flatten.plan import plan_layers
from worker.package.adds import add_identity, adds_layer, parse_add, with_add_layer


def _local_tree(tmp_path: Path) -> Path:
    src = tmp_path / "agent"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "init-agent").write_bytes(b"#!/bin/sh\necho agent\n")
    os.chmod(src / "bin" / "init-agent", 0o700)
    (src / "etc").mkdir()
    (src / "etc" / "agent.conf").write_text("port=1024\n")
    os.symlink("init-agent", src / "bin" / "agent")
    os.utime(src / "etc" / "agent.conf", (1_650_000_000, 1_650_000_000))
    return src


def test_add_layer_goes_on_top_through_the_planner(tmp_path: Path) -> None:
    src = _local_tree(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    plan0, locate0 = make_plan(tmp_path, [[
        directory("etc", mode=0o755, mtime=1_400_000_000),
        file("etc/ssl/certs/ca.pem", "old"),
        symlink("opt", "/usr/opt"),          # DEST through a symlink resolves inside the root
        directory("usr/opt"),
    ]])
    add_index, add_path = adds_layer(
        [AddSpec(src, "/opt/agent", uid=1000, gid=1000),
         AddSpec(ca, "/etc/ssl/certs/", mode=0o444)], tmp_path)
    assert add_index.compression == "none" and add_index.diff_id.startswith("sha256:")
    plan = plan_layers([*plan0.layers, add_index])

    locate = with_add_layer(locate0, add_index, add_path)
    out = tmp_path / "root.ext4"
    result = build(plan, locate, out, identity=add_identity("sha256:" + "ab" * 32, add_index))
    plain = build(plan0, locate0, tmp_path / "plain.ext4")
    assert result.uuid != plain.uuid
    assert fsck(out).returncode == 0
    agent = debugfs(out, "stat /usr/opt/agent/bin/init-agent")
    assert "Mode:  0700" in agent and "User:  1000   Group:  1000" in agent
    assert debugfs(out, "cat /usr/opt/agent/bin/init-agent").endswith("echo agent\n")
    assert "init-agent" in debugfs(out, "stat /usr/opt/agent/bin/agent")
    conf = debugfs(out, "stat /usr/opt/agent/etc/agent.conf")
    assert "mtime: 0x62590080" in conf   # 1_650_000_000, the source file's own
    pem = debugfs(out, "stat /etc/ssl/certs/ca.pem")
    assert "Mode:  0444" in pem and "User:     0   Group:     0" in pem
    assert debugfs(out, "cat /etc/ssl/certs/ca.pem").startswith("-----BEGIN")
    # the parents already in the image keep their metadata
    assert "mtime: 0x53724e00" in debugfs(out, "stat /etc")


def test_add_errors_name_the_bad_part(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        adds_layer([AddSpec(tmp_path / "missing", "/x")], tmp_path)
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UnsafeLayerEntry):
        adds_layer([AddSpec(f, "/../../escape")], tmp_path)
    with pytest.raises(ConfigError, match="SRC:DEST"):
        parse_add("no-colon")
    with pytest.raises(ConfigError, match="octal"):
        parse_add("a:/b", mode="rwx")
    with pytest.raises(ConfigError, match="UID:GID"):
        parse_add("a:/b", owner="root")
    spec = parse_add("./a:b:/opt/x", mode="0755", owner="5:6")
    assert spec == AddSpec(Path("./a:b"), "/opt/x", 0o755, 5, 6)
