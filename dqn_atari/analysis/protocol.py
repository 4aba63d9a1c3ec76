"""Evaluation protocols: ours (from protocol.json / config.yaml) and the papers' (parsed from the free-text
``protocol`` column of paper_scores.csv), with short labels and a plain-words comparison.

Protocols change Atari scores a lot (Machado et al. 2018, Sec. 5): start type (no-op starts, human starts,
sticky actions), evaluation epsilon (0.05 Nature; 0.001 Rainbow/Dopamine), episode cap (18,000 frames =
5 minutes in Nature's evaluation; 108,000 = 30 minutes elsewhere) and reporting (best snapshot, final
evaluation, or average of training episodes). Runs that differ in any of these are never averaged together.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def fmt_frames(frames: float | None) -> str:
    """200e6 -> '200M', 1e5 -> '0.1M'."""
    if frames is None:
        return "?"
    return f"{frames / 1e6:.3g}M"


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def start_kind(text: Any) -> str | None:
    """'sticky', 'human' or 'noop' from free text ('no-op starts', 'human-starts', 'sticky actions p=0.25'). OpenAI
    Baselines' Atari wrappers and SB3's AtariWrapper start with up to 30 no-ops (their NoopResetEnv)."""
    low = str(text or "").lower()
    patterns = (("sticky", "sticky"), ("human", "human"), ("noop", r"no-?op|baselines wrappers|atariwrapper"))
    return next((kind for kind, pattern in patterns if re.search(pattern, low)), None)


@dataclass(frozen=True)
class Protocol:
    """Our evaluation protocol, hashable so that runs can be grouped by it.

    The named fields label tables; ``details`` (every field of protocol.json but its free-text description)
    takes part in equality too, so runs differing in anything recorded are never averaged together.
    """

    name: str
    start: str | None = None  # start_kind() of protocol.json's 'start'
    noop_max: int | None = None
    sticky_p: float | None = None
    eval_epsilon: float | None = None
    max_episode_frames: int | None = None  # the evaluation episode cap
    overrides: str | None = None  # preset overrides, as recorded at the end of the description
    details: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @staticmethod
    def from_run(protocol: dict[str, Any], config: dict[str, Any]) -> Protocol:
        """Read protocol.json as the trainer writes it (see dqn_atari.rundir.PROTOCOL_JSON_FIELDS), falling back
        to config.yaml (``env.protocol``, ``eval.epsilon``, ``eval.max_episode_frames``) for missing fields."""
        env, ev = config.get("env") or {}, config.get("eval") or {}
        sticky = _first(protocol, "repeat_action_probability", "sticky_p")
        noop_max = _first(protocol, "noop_max")
        eps = _first(protocol, "eval_epsilon")
        # protocol.json's 'max_episode_frames' is the training cap of the env preset; evaluation has its own.
        cap = _first(protocol, "eval_max_episode_frames")
        eps = _first(ev, "epsilon") if eps is None else eps
        cap = _first(ev, "max_episode_frames") if cap is None else cap
        overrides = re.search(r"Overrides:\s*(.*?)\.?\s*$", str(protocol.get("description", "")))
        return Protocol(
            name=str(_first(protocol, "name") or _first(env, "protocol") or "unspecified"),
            start=start_kind(protocol.get("start")),
            noop_max=None if noop_max is None else int(noop_max),
            sticky_p=None if sticky is None else float(sticky),
            eval_epsilon=None if eps is None else float(eps),
            max_episode_frames=None if cap is None else int(cap),
            overrides=overrides.group(1) if overrides else None,
            details=tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in protocol.items()
                                 if k != "description")),
        )

    @property
    def start_type(self) -> str | None:
        """'sticky', 'noop', 'human' or None: what matters most when comparing with a paper."""
        if self.sticky_p:
            return "sticky"
        return "none" if self.noop_max == 0 and self.start in ("noop", None) else self.start

    def label(self) -> str:
        """Short, table-header sized: 'nature2015: noop 0-29 frames, eval eps=0.05, cap 18k frames' (ALE draws
        0 to noop_max - 1 no-op frames at a reset; dqn_atari.envs.atari)."""
        parts = []
        if self.start_type == "none":
            parts.append("no random starts")
        elif self.start == "noop":
            parts.append(f"noop 0-{self.noop_max - 1} frames" if self.noop_max else "noop starts")
        elif self.start == "human":
            parts.append("human starts")
        if self.sticky_p:
            parts.append(f"sticky p={_fmt_num(self.sticky_p)}")
        if self.eval_epsilon is not None:
            parts.append(f"eval eps={_fmt_num(self.eval_epsilon)}")
        if self.max_episode_frames:
            parts.append(f"cap {self.max_episode_frames / 1000:g}k frames")
        if self.overrides:
            parts.append(f"overrides: {self.overrides}")
        return f"{self.name}: {', '.join(parts)}" if parts else self.name


@dataclass(frozen=True)
class PaperProtocol:
    """What can be read from a paper_scores.csv protocol string."""

    text: str
    start_type: str | None
    eval_epsilon: float | None
    frames: float | None
    reporting: str | None  # 'best snapshot', 'training returns' or None (not stated)
    max_episode_frames: int | None

    def label(self) -> str:
        parts = [
            {"noop": "noop starts", "human": "human starts", "sticky": "sticky p=0.25"}.get(self.start_type or "", ""),
            f"eval eps={_fmt_num(self.eval_epsilon)}" if self.eval_epsilon is not None else "",
            f"cap {self.max_episode_frames / 1000:g}k frames" if self.max_episode_frames else "",
            self.reporting or "",
            f"{fmt_frames(self.frames)} frames" if self.frames else "",
        ]
        return ", ".join(p for p in parts if p) or self.text


def parse_paper_protocol(text: str) -> PaperProtocol:
    """Read start type, eval epsilon, frames, episode cap and reporting out of a free-text protocol."""
    low = str(text).lower()
    eps_match = re.search(r"eval eps\s*=?\s*([0-9.]+)", low)  # "eval eps=0.05" and "eval eps 0.001"
    eps = float(eps_match.group(1)) if eps_match else 0.0 if "greedy eval" in low else None
    frames_match = re.search(r"(\d+(?:\.\d+)?)m frames", low)
    steps_match = re.search(r"(\d+(?:\.\d+)?)m (?:agent )?steps", low)  # agent steps of 4 frames (e.g. SB3's)
    cap = 18_000 if re.search(r"\b5[- ]?min", low) else 108_000 if re.search(r"\b30[- ]?min", low) else None
    reporting = "best snapshot" if "best" in low else "training returns" if "training" in low else None
    return PaperProtocol(
        text=str(text),
        start_type=start_kind(low),
        eval_epsilon=eps,
        frames=(float(frames_match.group(1)) * 1e6 if frames_match
                else float(steps_match.group(1)) * 4e6 if steps_match else None),
        reporting=reporting,
        max_episode_frames=cap,
    )


def protocol_differences(ours: Protocol, frames_trained: float | None, paper: PaperProtocol) -> list[str]:
    """Plain-words differences between our run's protocol and a paper's (empty when nothing known differs)."""
    names = {"noop": "no-op starts", "human": "human starts", "sticky": "sticky actions", "none": "no random starts"}
    diffs = []
    if paper.start_type and ours.start_type and paper.start_type != ours.start_type:
        diffs.append(f"start: ours {names.get(ours.start_type, ours.start_type)}, paper {names[paper.start_type]}")
    if paper.eval_epsilon is not None and ours.eval_epsilon is not None and paper.eval_epsilon != ours.eval_epsilon:
        diffs.append(f"eval epsilon: ours {_fmt_num(ours.eval_epsilon)}, paper {_fmt_num(paper.eval_epsilon)}")
    if paper.max_episode_frames and ours.max_episode_frames and paper.max_episode_frames != ours.max_episode_frames:
        diffs.append(f"episode cap: ours {ours.max_episode_frames} frames, paper {paper.max_episode_frames} frames")
    if paper.frames and frames_trained and abs(paper.frames - frames_trained) > 0.02 * paper.frames:
        diffs.append(f"training length: ours {fmt_frames(frames_trained)} frames, paper {fmt_frames(paper.frames)}")
    if paper.reporting == "training returns":
        diffs.append("reporting: paper averages training episodes (exploring policy); ours are evaluation episodes")
    return diffs


def comparison_verdict(ours: Protocol, frames_trained: float | None, paper: PaperProtocol, quote: str = "") -> str:
    """How a paper's protocol compares with our run's, in words (``quote`` wraps our protocol's name)."""
    diffs = protocol_differences(ours, frames_trained, paper)
    name = f"{quote}{ours.name}{quote}"
    if diffs:
        return f"differs from ours ({name}): " + "; ".join(diffs)
    return f"matches ours ({name}) in start type, epsilon, cap and length as far as stated"
