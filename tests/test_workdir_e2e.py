"""Working directories end to end: upload only missing blocks, replicate, cache on hosts."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from leptond.blocks import unpack_block
from leptond.wire.client import ClusterClient, parse_addrs
from leptond.wire.errors import RpcError
from leptond.wire.tokens import CLUSTER_KEY_ID, cluster_psk, parse_token
from tests.harness import Cluster, Master, wait_for

READ_BOTH = "import hashlib,sys; print(hashlib.sha256(open('data/big.bin','rb').read()).hexdigest(), open('conf.txt').read().strip())"


def _make_workdir(d: Path) -> None:
    (d / "data").mkdir(parents=True)
    (d / "data" / "big.bin").write_bytes(os.urandom(9 << 20))  # 3 blocks of 4 MiB
    (d / "conf.txt").write_text("lr=0.1\n")
    (d / ".leptonignore").write_text("*.ckpt\n")
    (d / "skip.ckpt").write_bytes(b"x" * 1000)


def _submit(cluster: Cluster, wd: Path, *extra: str) -> dict[str, object]:
    out = cluster.ctl(
        "submit", "--workdir", str(wd), "-o", "json", *extra, "--", sys.executable, "-c", READ_BOTH
    )
    return dict(json.loads(out.stdout))


def test_workdir_resubmit_uploads_only_changes_and_second_host_needs_no_upload(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_agent("h1", gpus="1")
    cluster.wait_nodes_ready(1)
    wd = tmp_path / "wd"
    _make_workdir(wd)
    first = _submit(cluster, wd, "--gpus", "1")
    up = first["upload"]
    assert isinstance(up, dict)
    # 3 blocks of big.bin, conf.txt and .leptonignore; skip.ckpt is ignored.
    assert up["blocks"] == up["total_blocks"] == 5
    st = cluster.wait_job(str(first["id"]), {"succeeded", "failed"})
    assert st["state"] == "succeeded", st
    logs = cluster.ctl("logs", str(first["id"])).stdout.split()
    import hashlib

    assert logs == [hashlib.sha256((wd / "data" / "big.bin").read_bytes()).hexdigest(), "lr=0.1"]

    # Change one small file: only its block goes up again.
    (wd / "conf.txt").write_text("lr=0.2\n")
    second = _submit(cluster, wd, "--gpus", "1")
    up2 = second["upload"]
    assert isinstance(up2, dict)
    assert up2["blocks"] == 1 and up2["bytes"] == len("lr=0.2\n")
    assert cluster.wait_job(str(second["id"]), {"succeeded", "failed"})["state"] == "succeeded"
    assert cluster.ctl("logs", str(second["id"])).stdout.split()[1] == "lr=0.2"

    # A second host gets the same blocks from the masters: no upload at all.
    cluster.start_agent("h2", gpus="1")
    cluster.wait_nodes_ready(2)
    cluster.ctl("node", "drain", "h1")
    third = _submit(cluster, wd, "--gpus", "1")
    up3 = third["upload"]
    assert isinstance(up3, dict)
    assert up3["blocks"] == 0
    st3 = cluster.wait_job(str(third["id"]), {"succeeded", "failed"})
    assert st3["state"] == "succeeded" and st3["tasks"][0]["node"] == "h2"
    # The cache figures come with h2's next heartbeat: wait for it.
    wait_for(
        lambda: {n["name"]: n for n in cluster.nodes()}["h2"]["cache"].get("blocks") == 5,
        30,
        "h2's heartbeat to report its 5 cached blocks",
    )


def test_workdir_bad_input_is_refused_before_upload(cluster: Cluster, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "ok.py").write_text("print(1)\n")
    (wd / "escape").symlink_to(outside)
    out = cluster.ctl("submit", "--workdir", str(wd), "--", "true", check=False)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "outside" in out.stderr or "escape" in out.stderr

    (wd / "escape").unlink()
    os.mkfifo(wd / "pipe")
    out = cluster.ctl("submit", "--workdir", str(wd), "--", "true", check=False)
    assert out.returncode != 0 and "pipe" in out.stderr and "Traceback" not in out.stderr
    (wd / "pipe").unlink()

    # A hostile manifest sent straight to the API is refused and commits nothing.
    tok = parse_token(cluster.admin_token)

    async def hostile() -> str:
        c = ClusterClient(parse_addrs(cluster.addrs), key_id=tok.id, psk=tok.psk)
        try:
            bad = {
                "v": 1,
                "block_size": 4 << 20,
                "files": [{"path": "../../etc/x", "mode": 0o644, "size": 0, "blocks": []}],
                "links": [],
                "dirs": [],
            }
            try:
                await c.call("manifest_put", {"manifest": bad})
            except RpcError as exc:
                return exc.code + ": " + exc.message
            return "accepted"
        finally:
            await c.close()

    result = asyncio.run(hostile())
    assert result.startswith("bad_request"), result
    assert ".." in result or "path" in result


def test_workdir_over_the_limit_fails_before_uploading(cluster: Cluster, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "a.bin").write_bytes(b"\0" * 4096)
    import subprocess

    e = {"LEPTON_WORKDIR_MAX_BYTES": "1000"}
    env = dict(os.environ, **e)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "leptonctl.cli",
            "--addr",
            cluster.addrs,
            "--token",
            cluster.admin_token,
            "submit",
            "--workdir",
            str(wd),
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    assert out.returncode != 0
    assert "limit" in out.stderr or "over" in out.stderr, out.stderr
    stats = cluster.ctl_json("cluster", "status")["blocks"]
    assert stats.get("upload_blocks", 0) == 0


def test_corrupt_block_on_a_master_is_refetched_and_full_cache_fails_the_task_not_the_agent(
    cluster: Cluster, tmp_path: Path
) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    payload = os.urandom(1 << 20)
    (wd / "w.bin").write_bytes(payload)
    # A host whose block cache cannot hold even one block: the task fails clearly.
    tiny = cluster.start_agent("tiny", gpus="1", extra=["--cache-bytes", "1000"])
    cluster.wait_nodes_ready(1)
    res = json.loads(
        cluster.ctl("submit", "--workdir", str(wd), "-o", "json", "--", "cat", "w.bin").stdout
    )
    st = cluster.wait_job(res["id"], {"failed", "succeeded"})
    assert st["state"] == "failed"
    assert "workdir" in st["tasks"][0]["message"] and "cache" in st["tasks"][0]["message"]
    # The agent is unharmed: it still heartbeats and runs work without a workdir.
    job = cluster.submit("--", "true")
    assert cluster.wait_job(job, {"succeeded", "failed"})["state"] == "succeeded"

    tiny.stop()
    cluster.ctl("node", "rm", "tiny", "--force")
    # Restart every master (cold memory caches), then leave exactly one good
    # copy, on a follower: the leader reads a corrupt copy (dropped, never
    # served) or has none, and either way fetches the good one from a peer.
    for m in cluster.masters:
        cluster.restart_master(m)
    leader = cluster.wait_leader(60)

    def block_files(m: Master) -> list[Path]:
        root = cluster.root / f"master-{m.index}" / "blocks"
        return [p for p in root.rglob("*") if p.is_file() and len(p.name) == 64]

    holders = [m for m in cluster.masters if block_files(m)]
    assert len(holders) >= 2, "the block is on a majority of masters before its manifest commits"
    keep = next(m for m in holders if m is not leader)
    for m in holders:
        if m is not keep:
            for p in block_files(m):
                p.write_bytes(b"garbage" + p.read_bytes()[7:])
    cluster.start_agent("big", gpus="1")
    wait_for(
        lambda: any(n["name"] == "big" and n["state"] == "ready" for n in cluster.nodes()),
        60,
        "agent big",
    )
    res2 = json.loads(
        cluster.ctl("submit", "--workdir", str(wd), "-o", "json", "--", "sha256sum", "w.bin").stdout
    )
    st2 = cluster.wait_job(res2["id"], {"failed", "succeeded"}, timeout_s=90)
    assert st2["state"] == "succeeded", st2
    import hashlib

    assert cluster.ctl("logs", res2["id"]).stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    # Ask each master that had a corrupted copy for the block directly, as a
    # peer would: it never hands out the bad bytes, and it has dropped them.
    bid = hashlib.sha256(payload).hexdigest()
    secret = cluster.secret.read_bytes()

    async def peer_get(addr: str) -> dict[str, object]:
        c = ClusterClient(parse_addrs(addr), key_id=CLUSTER_KEY_ID, psk=cluster_psk(secret))
        try:
            return dict(await c.call("peer_block_get", {"id": bid}))
        finally:
            await c.close()

    for m in holders:
        if m is keep:
            continue
        got = asyncio.run(peer_get(m.rpc_addr))
        if got["found"]:
            data = unpack_block(got["data"], bool(got["z"]), 1 << 26)  # type: ignore[arg-type]
            assert hashlib.sha256(data).hexdigest() == bid
    dropped = sum(
        cluster.rpc("cluster_status", addr=m.rpc_addr)["blocks"]["corrupt_dropped"] for m in holders
    )
    assert dropped >= 1


def test_a_full_disk_on_an_agent_fails_the_task_and_the_agent_goes_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    import subprocess

    disk = tmp_path / "small-disk"
    disk.mkdir()
    # A real full file system: a 6 MiB tmpfs under the agent's data dir.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        # A reserve this small disk can keep: what fills it here is a workdir.
        extra = ["--data-dir", str(disk / "agent"), "--disk-reserve", "512K"]
        agent = cluster.start_agent("small", gpus="1", extra=extra)
        wait_for(
            lambda: any(n["name"] == "small" and n["state"] == "ready" for n in cluster.nodes()),
            60,
            "agent on the small disk",
        )
        wd = tmp_path / "wd"
        wd.mkdir()
        (wd / "big.bin").write_bytes(os.urandom(12 << 20))  # three 4 MiB blocks: more than the disk
        res = json.loads(
            cluster.ctl("submit", "--workdir", str(wd), "-o", "json", "--", "true").stdout
        )
        st = cluster.wait_job(res["id"], {"failed", "succeeded"}, timeout_s=90)
        assert st["state"] == "failed"
        msg = st["tasks"][0]["message"]
        assert "workdir" in msg and "No space left on device" in msg, msg
        # The agent goes on: it still heartbeats and runs work that fits.
        job = cluster.submit("--", "sh", "-c", "echo still here")
        assert cluster.wait_job(job, {"succeeded", "failed"}, timeout_s=60)["state"] == "succeeded"
        assert cluster.ctl("logs", job).stdout.strip() == "still here"
        assert agent.alive()
    finally:
        for p in cluster.agents:
            p.stop()
        cluster.kill_strays()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def test_placement_prefers_the_host_that_already_holds_the_workdir(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_agent("c1", gpus="1")
    cluster.start_agent("c2", gpus="1")
    cluster.wait_nodes_ready(2)
    # Both ways round, so node order alone cannot pass the test.
    for warm, cold in (("c2", "c1"), ("c1", "c2")):
        wd = tmp_path / f"wd-{warm}"
        wd.mkdir()
        (wd / "data.bin").write_bytes(os.urandom(1 << 20))
        cluster.ctl("node", "drain", cold)
        first = json.loads(
            cluster.ctl("submit", "--workdir", str(wd), "-o", "json", "--", "true").stdout
        )
        st = cluster.wait_job(first["id"], {"succeeded", "failed"})
        assert st["state"] == "succeeded" and st["tasks"][0]["node"] == warm
        cluster.ctl("node", "undrain", cold)
        wait_for(
            lambda c=cold: any(n["name"] == c and n["state"] == "ready" for n in cluster.nodes()),
            30,
            cold,
        )
        again = json.loads(
            cluster.ctl("submit", "--workdir", str(wd), "-o", "json", "--", "true").stdout
        )
        st = cluster.wait_job(again["id"], {"succeeded", "failed"})
        assert st["state"] == "succeeded"
        assert st["tasks"][0]["node"] == warm, f"expected the host with the cached blocks ({warm})"
