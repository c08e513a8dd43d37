"""Outbox durability details (issue 10): a failed ack delete is retried by itself; a clean
close leaves the WAL's truncation and seqmark.json's rename on disk."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import DiskFull
from agent.outbox import Outbox
from agent.outbox.seqmark import SEQMARK_NAME
from agent.outbox.store import DB_NAME
from tests.conftest import wait_for

SITE = "test-site"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of our own (the test runs as root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI container runs as root)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_ack_whose_delete_failed_on_a_full_disk_is_retried(tiny_disk: Path) -> None:
    """With no room even for the delete (no ballast, disk filled), the ack fails; once space
    returns the writer deletes by itself, without waiting for HQ's next ack."""
    ob = Outbox(str(tiny_disk / "outbox"), SITE, max_bytes=1 << 30, ballast_bytes=0)
    ob.open()
    filler = tiny_disk / "filler"
    try:
        for i in range(10):
            ob.submit("sale", json.dumps({"i": i, "pad": "x" * 1000}), "pos-1").result(5)
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(bytes(65536))
                fh.flush()
        with pytest.raises(DiskFull):
            ob.ack("sale", 10).result(10)
        assert ob.stats()["sale"].depth == 10
        filler.unlink()
        wait_for(lambda: ob.stats()["sale"].depth == 0, timeout=15,
                 what="the failed ack's delete retried")
        assert [s for s, _ in ob.read("sale", 0, 100)] == []
    finally:
        ob.close()


def test_a_clean_close_syncs_the_wal_truncation_and_the_seqmark_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power cut cannot be staged here, so this pins the syscalls durability rests on:
    at close, the truncated WAL file is fsynced, and the folder is fsynced after
    seqmark.json's last rename (SQLite's own syncs go through its VFS, not these)."""
    path = tmp_path / "outbox"
    ob = Outbox(str(path), SITE, max_bytes=1 << 30)
    ob.open()
    for i in range(200):
        ob.submit("sale", json.dumps({"i": i, "pad": "x" * 2000}), "pos-1").result(5)
    assert ob.read("sale", 0, 5)     # this thread holds a connection: the WAL outlives
    assert (path / f"{DB_NAME}-wal").stat().st_size > 0   # the writer's close
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ob.close()
    monkeypatch.undo()
    wal, folder, seqmark = str(path / f"{DB_NAME}-wal"), str(path), str(path / SEQMARK_NAME)
    assert ("fsync", wal) in calls, calls
    renames = [i for i, c in enumerate(calls) if c == ("replace", seqmark)]
    assert renames and ("fsync", folder) in calls[renames[-1]:], calls
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0
