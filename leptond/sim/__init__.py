"""A seeded simulation of the whole control plane (DESIGN §10, tier 3).

The real ClusterState, scheduler, leader controllers, agent code and RPC
methods run on a virtual clock (vtime.py), over a simulated network
(net.py), on a model of the Raft log (raftmodel.py), with simulated task
processes (host.py); faults and people's actions are drawn from the seed
(faults.py, people.py), and invariants are checked after every step
(checks.py). `run(seed, steps)` runs one seed (world.py); the command line
is `python -m leptond.sim --seed N --steps S`. docs/simulator.md says how to
read a failure and replay it.
"""

from .world import SimConfig, SimResult, run

__all__ = ["SimConfig", "SimResult", "run"]
