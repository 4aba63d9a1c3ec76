"""The one table mapping our variant names to the published data we compare them with.

``paper_algorithms`` are ``algorithm`` values of paper_scores.csv (the paper itself first, then
reproductions); ``aggregate_algorithms`` are ``algorithm`` values of aggregates.csv; ``dopamine_agent`` is an
``agent`` of dopamine_curves.csv (``legacy`` set: the TensorFlow baselines, RMSProp DQN as in Nature).
A test checks that every name below exists in the vendored CSVs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantRef:
    label: str
    paper_algorithms: tuple[str, ...] = ()
    aggregate_algorithms: tuple[str, ...] = ()
    dopamine_agent: str | None = None
    dopamine_set: str = "legacy"
    ablation: str | None = None  # for Rainbow ablations: the legend label of Hessel et al. 2018, Fig. 3


VARIANTS: dict[str, VariantRef] = {
    "nature_dqn": VariantRef(
        "DQN (Mnih et al. 2015)",
        ("DQN (Mnih 2015, Nature)", "DQN (Dueling-paper no-op re-eval; used by C51/Rainbow)",
         "DQN [Dopamine legacy baselines]", "DQN [PFRL repro]"),
        ("DQN (Mnih 2015, Nature)", "DQN (Nature numbers)", "Nature DQN", "DQN (Dueling-paper numbers)",
         "DQN [Dopamine legacy baselines]", "DQN (Nature) [rliable]", "DQN [DQN Zoo]"),
        dopamine_agent="DQN",
    ),
    "double_dqn": VariantRef(
        "Double DQN (van Hasselt et al. 2016)",
        ("DDQN (van Hasselt 2016)", "DDQN (Dueling-paper no-op re-eval)", "DDQN-tuned (van Hasselt 2016)"),
        ("DDQN (van Hasselt 2016)", "Double DQN", "Double DQN (Single)", "DDQN (*)",
         "DDQN (Dueling-paper no-op re-eval)", "Double DQN [DQN Zoo]"),
    ),
    "dueling": VariantRef(
        "Dueling DDQN (Wang et al. 2016)",
        ("Dueling DDQN (Wang 2016, 'Duel Clip')",),
        ("Dueling DDQN (Wang 2016, 'Duel Clip')", "Dueling DDQN (Duel Clip)", "Dueling DDQN (*)"),
    ),
    "prioritized": VariantRef(
        "Prioritized DDQN (Schaul et al. 2016)",
        ("Prioritized DDQN proportional (Schaul 2016)", "Prioritized DDQN (Rainbow-paper no-op table)",
         "Prioritized DDQN rank-based (Dueling-paper no-op re-eval)"),
        ("Prioritized DDQN proportional (Schaul 2016)", "DDQN + proportional", "Prioritized DDQN (*)",
         "Prioritized DDQN (Rainbow-paper no-op table)", "Prioritized DQN [DQN Zoo]"),
    ),
    "c51": VariantRef(
        "C51 (Bellemare et al. 2017)",
        ("C51 (Bellemare 2017)", "Distributional DQN (Rainbow-paper re-impl.)", "C51 [Dopamine legacy baselines]"),
        ("C51 (Bellemare 2017)", "C51", "Distributional DQN", "Distributional DQN (Rainbow-paper re-impl.)",
         "C51 [Dopamine legacy baselines]", "C51 [rliable]", "C51 [DQN Zoo]"),
        dopamine_agent="C51",
    ),
    "noisy": VariantRef(
        "Noisy DQN (Fortunato et al. 2018)",
        ("Noisy DQN (Rainbow-paper re-impl.)",),
        ("Noisy DQN (Rainbow-paper re-impl.)", "Noisy DQN"),
    ),
    "rainbow": VariantRef(
        "Rainbow (Hessel et al. 2018)",
        ("Rainbow (Hessel 2018)", "Rainbow [Dopamine legacy baselines]", "Rainbow [PFRL repro]"),
        ("Rainbow (Hessel 2018)", "Rainbow", "Rainbow [Dopamine legacy baselines]", "Rainbow [rliable]",
         "Rainbow [DQN Zoo]"),
        # Dopamine's Rainbow keeps only C51 + n-step + prioritized replay (Castro et al. 2018).
        dopamine_agent="Rainbow",
    ),
    "qr_dqn": VariantRef(
        "QR-DQN (Dabney et al. 2018)",
        ("Quantile (JAX) [Dopamine legacy baselines]", "QR-DQN [Dopamine JAX (Nature CNN)]"),
        ("Quantile (JAX) [Dopamine legacy baselines]", "QR-DQN [Dopamine JAX Nature-CNN]", "QR-DQN [DQN Zoo]"),
        dopamine_agent="Quantile (JAX)",
    ),
    "iqn": VariantRef(
        "IQN (Dabney et al. 2018)",
        ("IQN [Dopamine legacy baselines]", "IQN [Dopamine JAX (Nature CNN)]"),
        ("IQN [Dopamine legacy baselines]", "IQN [Dopamine JAX Nature-CNN]", "IQN [rliable]", "IQN [DQN Zoo]"),
        dopamine_agent="IQN",
    ),
    # Rainbow ablations (Hessel et al. 2018, "Ablation studies" and Fig. 3): Rainbow with one component off.
    # No per-game numbers of the ablations are vendored; the figure compares their medians over time.
    **{
        f"rainbow_no_{part}": VariantRef(f"Rainbow without {label[3:]}", ablation=label)
        for part, label in (
            ("double", "no double"),
            ("prioritized", "no priority"),
            ("dueling", "no dueling"),
            ("multistep", "no multi-step"),
            ("distributional", "no distribution"),
            ("noisy", "no noisy"),
        )
    },
}

ABLATION_BASE = "rainbow"
ABLATION_BASELINE = "nature_dqn"  # drawn grey, as DQN is in Hessel et al. 2018, Fig. 3


def variant_ref(variant: str) -> VariantRef:
    """The published data for ``variant``; an empty entry (nothing to compare) for unknown names."""
    return VARIANTS.get(variant, VariantRef(variant))
