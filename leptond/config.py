"""Master configuration, as parsed from `leptond run` flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from raft.validate import MAX_MEM

from .wire import pacing


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
    # Silence after which a node is down (a stopped or cut-off host closes
    # nothing, so only this applies). Agents heartbeat every second; 4 s
    # leaves room for event-loop stalls of a second or more
    # (bench/reschedule.py --cause stall) with a lease of 3.2 s.
    heartbeat_ttl_s: float = 4.0
    # Fencing (agent/lease.py): a node's tasks are killed by their shims when
    # its lease, renewed by the leader's heartbeat answers, runs out; the TTL
    # must be longer than the lease plus the margin (the time a shim needs to
    # notice and kill). None: derived from the TTL (see task_lease_s).
    lease_s: float | None = None
    lease_margin_s: float | None = None
    # Fast path (agent/lease.py, "Disconnects"): when the leader reads an
    # end-of-stream from a node's agent connection (the agent closed it, or
    # died and its kernel did), the node is suspect at once and declared down
    # after this window plus `disconnect_margin_s`, unless the agent registers
    # again meanwhile. The agent (or, when it died, each shim) cuts the lease
    # to end within the window, so the tasks are dead by then. 0: off (only
    # the TTL applies).
    disconnect_confirm_s: float = 1.0
    # What the margin covers: a shim noticing the agent's death (it waits on
    # a pidfd, so at once unless starved of CPU) and killing its task.
    disconnect_margin_s: float = 0.5
    # Heartbeats all agents together send each second, at most: the leader
    # asks each agent for an interval of live nodes / this (never more than
    # the TTL and the lease allow, leptond/wire/pacing.py). Below 8,000
    # nodes agents keep their own 1 s; at 10,000 with the default TTL the cap
    # (1.219 s) binds first, about 8,200 a second, which cut the leader's CPU
    # from 66.6 to 61.3 % of a core (docs/benchmarks.md, "Heartbeat pacing").
    # 0: off (agents keep their own interval).
    max_heartbeats_per_s: float = 8000.0
    commit_timeout_s: float = 5.0
    kill_grace_s: float = 10.0
    # The longest a preemption waits for a victim that asked for a warning
    # signal (--preempt-grace) to checkpoint and exit; submits over it are
    # refused.
    max_preempt_grace_s: float = 300.0
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
    # How often a master tries again to connect to a peer it has no
    # connection to. pysyncobj lets only the peer with the larger address
    # connect, so a restarted master takes part in votes only once the
    # others reconnect to it: at 1 s, a leader lost soon after a restart
    # could wait that long for an election (bench/failover.py).
    raft_connection_retry_s: float = 0.2
    # Raft log entries between snapshots (pysyncobj log compaction); the
    # journal and a restart's replay stay bounded by about this many entries.
    snapshot_every: int = 5000
    job_retention_s: float = 7 * 86400.0
    block_cache_bytes: int = 256 << 20
    # Workdir blocks on this master: all of them, and what each user's uploads
    # may hold (0: no per-user limit). Both refuse new blocks when full.
    block_store_bytes: int = 16 << 30
    upload_quota_bytes: int = 4 << 30
    # Below this much free space on the data disk, new jobs and uploads are
    # refused; what is left keeps the Raft journal writable for running work.
    min_free_disk_bytes: int = 512 << 20
    # RPC: bytes all connections together may hold in partly received frames.
    max_buffered_bytes: int = 256 << 20
    # RPC: connections open at once (each agent holds one). The master raises
    # its open-file limit to fit them, up to the hard limit (fdlimit.py).
    max_connections: int = 16384
    # RPC: authenticated connections one key may hold at once (0: no cap), so
    # that one token cannot take every slot: an agent holds one, a leptonctl
    # command one, each `logs -f` or `exec` one more.
    max_connections_per_key: int = 256
    block_cache_policy: Literal["lru", "lfu"] = "lru"
    # Whether tasks may run as uid 0 (a token mapped to root, such as the
    # admin token `leptond init` writes). Agents refuse uid 0 without it.
    allow_root_tasks: bool = False
    # Memory limit per GPU for jobs with GPUs that give no --mem, and per CPU
    # for the others (and for GPU jobs without a per-GPU default); 0: none
    # (agents still hold a task without one to the host's limit for tasks).
    default_mem_per_gpu: int = 0
    # Fair share counts each user's recent usage, decayed with this
    # half-life (Slurm's PriorityDecayHalfLife); 0: only what runs now.
    fair_share_half_life_s: float = 0.0
    # How long usage per user and day is kept (it outlives the jobs).
    usage_retention_s: float = 400 * 86400.0
    # Each user's jobs waiting to start, and the bytes of their specs: a
    # submit over either is refused (they live in every master's memory and
    # in every snapshot). 0: no cap.
    max_pending_jobs: int = 10_000
    max_pending_spec_bytes: int = 64 << 20
    # Each user's tasks waiting to start (an array counts each of its tasks).
    max_pending_tasks: int = 200_000
    # The audit log is rotated at this size (leptond/audit.py).
    audit_log_bytes: int = 64 << 20
    default_mem_per_cpu: int = 0

    def default_mem_bytes(self, gpus: int, cpus: float) -> int:
        """The memory limit of a job that gives none (0: none)."""
        if gpus > 0 and self.default_mem_per_gpu > 0:
            mem = gpus * self.default_mem_per_gpu
        else:
            mem = int(cpus * self.default_mem_per_cpu)
        return min(mem, MAX_MEM)  # what a spec may ask for

    # Highest priority each user may submit at (`--max-priority user=N`), and
    # for users not named (`--default-max-priority N`; None: no cap). Admins
    # are not capped: they could make themselves any token anyway.
    max_priority: dict[str, int] = field(default_factory=dict)
    default_max_priority: int | None = None

    def max_priority_of(self, user: str) -> int | None:
        return self.max_priority.get(user, self.default_max_priority)

    @property
    def margin_s(self) -> float:
        if self.lease_margin_s is not None:
            return self.lease_margin_s
        return min(1.0, 0.1 * self.heartbeat_ttl_s)

    @property
    def task_lease_s(self) -> float:
        if self.lease_s is not None:
            return self.lease_s
        return self.heartbeat_ttl_s - 2 * self.margin_s

    @property
    def heartbeat_cap_s(self) -> float:
        """The longest heartbeat interval this leader asks of an agent."""
        return pacing.cap_s(self.heartbeat_ttl_s, self.task_lease_s)

    @property
    def disconnect_down_s(self) -> float | None:
        """Seconds from reading a node's end-of-stream to declaring it down;
        None when the fast path is off."""
        if self.disconnect_confirm_s <= 0:
            return None
        return self.disconnect_confirm_s + self.disconnect_margin_s

    @property
    def lease_contact_s(self) -> float:
        """A leader renews leases only while a majority answered it this
        recently; a new leader waits this much longer than the TTL before
        judging a node, for leases a deposed leader may have renewed."""
        return max(1.0, self.raft_max_timeout_s)

    def check(self) -> None:
        """Raise ValueError with one line for people when the settings cannot work."""
        ttl, lease, margin = self.heartbeat_ttl_s, self.task_lease_s, self.margin_s
        if margin < 0:
            raise ValueError("--lease-margin must not be negative")
        if lease < 1.0:
            raise ValueError(
                f"the task lease ({lease:g}s) must be at least 1s: agents renew it about "
                "once a second (raise --heartbeat-ttl or --task-lease)"
            )
        if self.disconnect_confirm_s < 0 or self.disconnect_margin_s < 0:
            raise ValueError("--disconnect-confirm and --disconnect-margin must not be negative")
        if self.disconnect_confirm_s > 0 and self.disconnect_margin_s < 0.2:
            raise ValueError(
                f"--disconnect-margin ({self.disconnect_margin_s:g}s) must be at least 0.2s: "
                "it is the time a host's task supervisors have to kill the tasks of a node "
                "whose agent went away before the leader runs them elsewhere"
            )
        if not math.isfinite(self.max_heartbeats_per_s) or self.max_heartbeats_per_s < 0:
            raise ValueError(
                f"--max-heartbeats-per-second ({self.max_heartbeats_per_s:g}) must be a "
                "number of heartbeats a second, 0 or more (0: agents keep their own interval)"
            )
        if ttl <= lease + margin:
            raise ValueError(
                f"--heartbeat-ttl ({ttl:g}s) must be longer than the task lease ({lease:g}s) "
                f"plus its margin ({margin:g}s): a node's tasks must be dead before the "
                "leader declares it down and runs them elsewhere"
            )

    @property
    def host(self) -> str:
        return self.advertise or self.bind

    @property
    def raft_addr(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def raft_bind_addr(self) -> str:
        """Where the Raft port listens: the address peers dial, unless --bind
        asks for every interface."""
        if self.bind in ("0.0.0.0", "::"):
            return f"{self.bind}:{self.raft_port}"
        return self.raft_addr

    @property
    def rpc_addr(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    @property
    def http_addr(self) -> str:
        return f"{self.host}:{self.http_port}"
