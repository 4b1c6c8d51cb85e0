"""Node configuration: `[node]` and `[learning]` tables of a TOML file, overridable by flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NodeConfig", "NodeSection"]


@dataclass(frozen=True, slots=True)
class NodeSection:
    federation: str = "knexa"
    model: str = "smollm2-135m"
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    state_dir: Path = Path(".knexa/node")
    #: this node's private shard (train.jsonl, val.jsonl); only this folder is ever opened
    data_dir: Path | None = None
    #: public sets shared by the federation (test.jsonl, transfer.jsonl); default data_dir/../public
    public_dir: Path | None = None
    #: the CPM's full multiaddr, with /p2p/<peer-id> (its id is pinned for directive signatures)
    cpm: str = ""
    #: peers to dial at start-up and keep connected (full multiaddrs), dialled in the background
    bootstrap: tuple[str, ...] = ()
    #: base58 peer ids of the federation; empty = accept any peer (logged as a warning)
    roster: tuple[str, ...] = ()
    #: a roster file ([[peer]] id/name/addr, see knexa_runtime.roster), merged with `roster`;
    #: its addrs are dialled like `bootstrap`. Re-read on SIGHUP.
    roster_file: Path | None = None
    #: stop after this many rounds (0 = run until stopped)
    rounds: int = 0
    cpm_connect_timeout_s: float = 60.0
    directive_timeout_s: float = 900.0
    directive_poll_s: float = 5.0
    package_timeout_s: float = 900.0
    stream_timeout_s: float = 60.0
    max_package_bytes: int = 8 * 1024 * 1024
    #: Eq. 3: r = gamma * (L_pre - L_post) - delta * KB
    reward_gamma: float = 1.0
    reward_delta: float = 0.001
    #: profile sanitization: rounding decimals; Laplace epsilon per noised profile (0 = no noise,
    #: unbounded privacy loss); total epsilon budget, after which the dynamic features are frozen
    #: at their last noised values (0 = no limit). Defaults: knexa_node.profile, docs/security.md
    profile_decimals: int = 2
    profile_epsilon: float = 100.0
    profile_epsilon_budget: float = 5000.0
    #: also send the node's validation Pass@1 per category ("skills", 12 values, sanitized like the
    #: profile) for the CPM's hybrid matching policy, which predicts a teacher's use far better from
    #: them than from the data histogram. Off by default: they reveal where this node is strong,
    #: and each round's skills are one more noised release (a second profile_epsilon per round,
    #: so the budget lasts half as many rounds). docs/security.md "Profile privacy"
    share_skills: bool = False
    #: evaluate once more after the last round (for the final summary)
    final_eval: bool = True
    log_level: str = "INFO"
    #: "text" (key=value) or "json" (one JSON object per line)
    log_format: str = "text"
    #: Prometheus endpoint "HOST:PORT" ("" = off; port 0 = any free port, logged)
    metrics_listen: str = ""
    #: seconds SIGTERM waits for a running ML step before abandoning it (state is per round)
    stop_grace_s: float = 10.0
    #: NAT traversal (docs/operations.md): ask the CPM for a dial-back; when it fails, hold a relay
    #: reservation (at the CPM and at `relays`) and publish /p2p-circuit addresses; accept and dial
    #: relayed connections; `hole_punch` upgrades relayed connections with DCUtR
    nat_traversal: bool = True
    hole_punch: bool = True
    #: extra relays (full multiaddrs, e.g. a member running with relay_service = true)
    relays: tuple[str, ...] = ()
    #: offer circuit relay v2 to members from this node (it must be publicly reachable)
    relay_service: bool = False

    def __post_init__(self) -> None:
        from knexa_runtime.daemon import check_common

        check_common(self.log_format, self.metrics_listen, self.log_level)
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")
        if self.max_package_bytes <= 0:
            raise ValueError("max_package_bytes must be > 0")
        if not (math.isfinite(self.profile_epsilon) and self.profile_epsilon >= 0):
            raise ValueError("profile_epsilon must be >= 0 (0 = no noise)")
        if not (math.isfinite(self.profile_epsilon_budget) and self.profile_epsilon_budget >= 0):
            raise ValueError("profile_epsilon_budget must be >= 0 (0 = no limit)")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    #: knobs of the learning stack (knexa_node.torch_backend.LearningConfig), checked on load
    learning: dict[str, Any] = field(default_factory=dict)
