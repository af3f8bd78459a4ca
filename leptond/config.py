"""Master configuration, as parsed from `leptond run` flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class MasterConfig:
    data_dir: Path
    secret_file: Path
    admin_token_file: Path
    bind: str = "127.0.0.1"
    advertise: str = ""  # host other machines reach us at; defaults to bind
    rpc_port: int = 7441
    http_port: int = 7440
    raft_port: int = 7442
    peers: tuple[str, ...] = ()  # other masters' HOST:RAFTPORT
    heartbeat_ttl_s: float = 10.0
    commit_timeout_s: float = 5.0
    kill_grace_s: float = 10.0
    preemption: bool = True
    # What --no-preempt costs: protection only while the user is within quota
    # ("within-quota"), or always ("always").
    no_preempt: str = "within-quota"
    quotas: dict[str, int] = field(default_factory=dict)
    # Election timeouts: a follower that hears no leader for a random time in
    # this range stands for election. Short enough for failover p99 <= 1.5 s
    # (bench/failover.py); pysyncobj needs the minimum above 3 heartbeats (0.3 s).
    raft_min_timeout_s: float = 0.35
    raft_max_timeout_s: float = 0.8
    # Raft log entries between snapshots (pysyncobj log compaction); the
    # journal and a restart's replay stay bounded by about this many entries.
    snapshot_every: int = 5000
    job_retention_s: float = 7 * 86400.0
    block_cache_bytes: int = 256 << 20
    block_cache_policy: Literal["lru", "lfu"] = "lru"
    # Whether tasks may run as uid 0 (a token mapped to root, such as the
    # admin token `leptond init` writes). Agents refuse uid 0 without it.
    allow_root_tasks: bool = False
    # Memory limit per GPU for jobs that give no --mem; 0: none.
    default_mem_per_gpu: int = 0

    @property
    def host(self) -> str:
        return self.advertise or self.bind

    @property
    def raft_addr(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def rpc_addr(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    @property
    def http_addr(self) -> str:
        return f"{self.host}:{self.http_port}"
