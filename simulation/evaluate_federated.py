"""Federated rows of ``restwise evaluate``: FedAvg without DP, and with distributed DP.

This is the deployed federated algorithm **run in-process for evaluation**: the same functions
the Flower stack runs - the device's training step (``models.training.federated_update``, what
the recovery network's architecture runs in ``client.app.local_update``), its DP step
(``privacy.dp_mods.privatize`` with the parameters of ``privacy.release.dp_parameters``), the
server's FedAvg step (``models.registry.fedavg_apply``) and the release planner
(``privacy.release.plan_release``) - without the transport. What the transport and secure aggregation add is exercised by the
simulation and deployment tests; secure aggregation's sum is exact (masks cancel, the
fixed-point encoding rounds to 2^-frac_bits), so summing the devices' contributions in
float64 here gives the same aggregate.

One round (every person is one device holding only their own *training* examples; all
devices take part in every round, i.e. full participation):

1. each device loads the global shared part into its model (its personal part - scale,
   threshold, calibration - stays on the device from round to round) and runs
   ``training.train_local`` for ``local_epochs`` on its own examples (shared and personal
   part, as ``client.app.local_update`` does; seed ``training.round_seed(seed, round)``);
2. its update is the change of the shared arrays (float64);
3. DP row: the device clips it to L2 norm ``clip_norm`` (``privacy.dp_mods.clip_update``) and
   adds its noise share N(0, (z C)^2 / (n - 1)) per coordinate. Under add/remove adjacency a
   person's own share is not counted (``privacy.events.counted_noise_shares``), so the other
   n - 1 shares protect them with total std exactly z C;
   no-DP row: the deployed "plain" mode, the raw update (no clipping, no noise);
4. the server adds the exact sum / n to the global shared part (``new = old + sum /
   expected_cohort``, expected cohort = n under full participation).

Then each person is personalised exactly as the "personalised" row
(``models.evaluation.Personalised``): the final global shared part in a fresh model, the
person's own scale (mean, SD, low threshold of their training days) in the personal part,
and optionally the personal part fine-tuned on their own training days - the number of
fine-tune epochs (0 or 3) chosen on the validation slices (the protocol's split inside each
person's training days), never on the test period. Predictions are the mean of an ensemble
of ``n_seeds`` independent federated runs, snapped like theirs: 3 runs for the no-DP row (as
the other neural rows), 1 run for the DP row (:func:`federated_methods`: each ensemble member
would be another ``rounds`` releases of the same data, paid for with more noise per round).

Privacy spent by the DP row (reported in its row name and ``chosen``): the noise multiplier
z is calibrated with ``privacy.calibration`` so that the accountant's epsilon (PLD,
add/remove, full participation, delta = 1e-5) over **all releases of the reported model** -
``rounds x n_seeds`` - is at most the target; the row shows the accountant's value at that z.
Clip norm 1.0 is about the median norm of a device's raw update on SoccerMon (1.0-1.2 over
the 10 rounds; 10th-90th percentile 0.6-1.5), the usual choice (Andrew et al. 2021). The validation runs that
choose the fine-tune epochs are DP-noised the same way and release ``rounds x n_seeds`` more
aggregates of the first 80% of the same training days; ``chosen["epsilon_with_selection"]``
is the accountant's epsilon over both (the selection is a cohort-level choice among two
candidates and is not otherwise accounted). Fixed, documented hyper-parameters (no test-set
peeking): clip norm 1.0, learning rate 3e-3 and target epsilon 8 as in the demo run
(``simulation.demo.demo_config``), ``FEDERATED_ROUNDS`` rounds of ``FEDERATED_LOCAL_EPOCHS``
local epoch (``models.training``). Noise here comes from a seeded NumPy generator so the
table is reproducible; devices draw from OS entropy (``dp_mods.noise_rng``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from restwise.common.arrays import flatten
from restwise.models.evaluation import (
    EvaluationError,
    NeuralConfig,
    PersonSplit,
    Personalised,
    ProtocolConfig,
    ensemble_seeds,
    limited_threads,
    network_config,
    validation_or_none,
)
from restwise.models.network import build_model, set_shared_arrays, shared_arrays
from restwise.models.registry import fedavg_apply, round_seed
from restwise.models.training import FEDERATED_LOCAL_EPOCHS, FEDERATED_ROUNDS, federated_update
from restwise.privacy.dp_mods import clip_update, privatize
from restwise.privacy.release import MIN_COHORT, ReleasePolicy, dp_parameters, expected_epsilon, plan_release
from restwise.simulation.demo import DEMO_CLIP_NORM, DEMO_TARGET_EPSILON

DEFAULT_CLIP_NORM = DEMO_CLIP_NORM
DEFAULT_TARGET_EPSILON = DEMO_TARGET_EPSILON
DEFAULT_DELTA = 1e-5


def full_participation_policy(
    releases: int,
    *,
    clip_norm: float,
    delta: float = DEFAULT_DELTA,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    devices: int = MIN_COHORT,
) -> ReleasePolicy:
    """The evaluation's releases as the privacy side sees them: every device in every release
    (q = 1, add/remove adjacency), distributed noise. With full participation the epsilon does
    not depend on how many devices there are; their number only sizes the noise shares."""
    return ReleasePolicy(sensitivity=clip_norm, population=max(int(devices), 1), sampling="poisson", sampling_rate=1.0,
                         releases=int(releases), delta=delta, noise_multiplier=noise_multiplier,
                         target_epsilon=target_epsilon, noise="distributed")


def noise_share_std(noise_multiplier: float, clip_norm: float, n_devices: int) -> float:
    """One device's noise std per coordinate: z C / sqrt(n - 1) (add/remove: the n - 1 other
    devices' shares protect a person; their total std is z C)."""
    if n_devices < 2:
        raise EvaluationError("distributed DP needs at least 2 devices")
    policy = full_participation_policy(1, clip_norm=clip_norm, noise_multiplier=noise_multiplier, devices=n_devices)
    return dp_parameters(policy, noise_multiplier, n_devices).share_std


def privacy_spent(noise_multiplier: float, releases: int, delta: float = DEFAULT_DELTA) -> float:
    """The accountant's epsilon after ``releases`` full-participation add/remove releases
    whose counted noise has std ``noise_multiplier x C``."""
    plan = plan_release(full_participation_policy(releases, clip_norm=DEFAULT_CLIP_NORM, delta=delta,
                                                  noise_multiplier=noise_multiplier))
    return expected_epsilon(plan, releases)


def calibrate(target_epsilon: float, releases: int, delta: float = DEFAULT_DELTA) -> float:
    """The smallest noise multiplier whose epsilon over ``releases`` is <= the target."""
    return plan_release(full_participation_policy(releases, clip_norm=DEFAULT_CLIP_NORM, delta=delta,
                                                  target_epsilon=target_epsilon)).noise_multiplier


def federated_train(
    splits: Sequence[PersonSplit],
    model_config,
    *,
    rounds: int,
    local_epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    clip_norm: float | None,
    noise_multiplier: float | None,
    rng: np.random.Generator | None = None,
    on_round=None,
    on_update=None,
):
    """Run the federated rounds; returns the final global model (a RecoveryNet whose personal
    part is untouched, i.e. the initial one). ``clip_norm=None`` is the plain mode (raw
    updates); ``noise_multiplier`` needs a clip norm. ``on_round(round, sum_of_updates,
    global_before, global_after)`` and ``on_update(round, person, contribution)`` (what the
    device adds to the sum: clipped and noised) are for tests."""
    if noise_multiplier is not None and clip_norm is None:
        raise EvaluationError("DP noise needs a clip norm")
    n = len(splits)
    if n < 2:
        raise EvaluationError("federated training needs at least 2 persons")
    params = None
    if noise_multiplier is not None:
        policy = full_participation_policy(rounds, clip_norm=clip_norm, noise_multiplier=noise_multiplier, devices=n)
        params = dp_parameters(policy, noise_multiplier, n)  # all n survive every round
    global_model = build_model(model_config)
    # The global shared part is kept in float64 between rounds (the devices load it as float32).
    shared = [a.astype(np.float64) for a in shared_arrays(global_model)]
    rng = rng if rng is not None else np.random.default_rng(seed)
    devices = {s.person: build_model(model_config) for s in splits}
    examples = {s.person: s.train.to_examples(s.days) for s in splits}
    for rnd in range(1, rounds + 1):
        total = np.zeros(sum(a.size for a in shared))
        for s in splits:
            update, _ = federated_update(devices[s.person], shared, examples[s.person], epochs=local_epochs, lr=lr,
                                         batch_size=batch_size, seed=round_seed(seed, rnd),
                                         low_threshold=s.low_threshold, weight_decay=weight_decay)
            if params is not None:
                update = privatize(update, params, rng)  # the device's DP step: clip, noise share
            elif clip_norm is not None:
                update, _ = clip_update(update, clip_norm)
            if on_update is not None:
                on_update(rnd, s.person, update)
            total += update
        new_shared = fedavg_apply(shared, total, n)  # expected cohort = n under full participation
        if on_round is not None:
            on_round(rnd, total, flatten(shared), flatten(new_shared))
        shared = new_shared
    set_shared_arrays(global_model, shared)
    return global_model


@dataclass
class FederatedMethod:
    """A federated row (Method protocol): FedAvg of the shared part over the persons' devices,
    plain or with distributed DP, then personalised as the "personalised" row. Give at most
    one of ``noise_multiplier`` and ``target_epsilon`` (neither: no DP)."""

    rounds: int = FEDERATED_ROUNDS
    local_epochs: int = FEDERATED_LOCAL_EPOCHS
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    cfg: NeuralConfig = field(default_factory=NeuralConfig)
    config: ProtocolConfig = field(default_factory=ProtocolConfig)
    description: str = ""

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1:
            raise EvaluationError("rounds and local_epochs must be >= 1")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise EvaluationError("give at most one of noise_multiplier and target_epsilon")
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise EvaluationError("clip_norm must be a positive finite number")
        if self.dp and self.clip_norm is None:
            self.clip_norm = DEFAULT_CLIP_NORM
        if self.target_epsilon is not None:
            self.noise_multiplier = calibrate(self.target_epsilon, self.releases, self.delta)
        self.epsilon = privacy_spent(self.noise_multiplier, self.releases, self.delta) if self.dp else None
        if not self.description:
            self.description = (
                f"FedAvg of the shared part ({self.rounds} rounds x {self.local_epochs} local epoch), "
                + (f"clip {self.clip_norm:g}, distributed noise z={self.noise_multiplier:.3g}, "
                   f"eps={self.epsilon:.2f} at delta={self.delta:g}" if self.dp else "no clipping, no noise")
                + "; personal scale + fine-tune on the device")

    @property
    def dp(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @property
    def releases(self) -> int:
        """Aggregates released to train the reported model: one per round per ensemble member."""
        return self.rounds * self.cfg.n_seeds

    def global_models(self, splits: Sequence[PersonSplit], seed: int) -> list:
        out = []
        for sd in ensemble_seeds(seed, self.cfg.n_seeds):
            out.append(federated_train(
                splits, network_config(splits, self.cfg, sd), rounds=self.rounds,
                local_epochs=self.local_epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size,
                weight_decay=self.cfg.weight_decay, seed=sd, clip_norm=self.clip_norm,
                noise_multiplier=self.noise_multiplier, rng=np.random.default_rng([sd, 104729])))
        return out

    def fit_predict(self, splits, seed):
        with limited_threads(self.cfg.threads):
            return self._fit_predict_all(splits, seed)

    def _fit_predict_all(self, splits, seed):
        personaliser = Personalised(self.cfg, self.config)
        epochs_grid = tuple(self.cfg.finetune_epochs)
        epochs = epochs_grid[0]
        val = validation_or_none(splits, self.config) if len(epochs_grid) > 1 else None
        selection_releases = 0
        if val:
            bases_val = self.global_models(val, seed)
            selection_releases = self.releases
            scores = []
            for i, e in enumerate(epochs_grid):
                preds = personaliser.finetune_predict(bases_val, val, e, seed, (1.0,))[1.0]
                mae = float(np.mean([np.mean(np.abs(preds[s.person].value - s.test.y)) for s in val]))
                scores.append((mae, i))
            epochs = epochs_grid[min(scores)[1]]
        bases = self.global_models(splits, seed)
        self.chosen = {"finetune_epochs": epochs, "rounds": self.rounds, "local_epochs": self.local_epochs,
                       "clip_norm": self.clip_norm, "devices": len(splits)}
        if self.dp:
            self.chosen.update({
                "noise_multiplier": self.noise_multiplier, "delta": self.delta,
                "releases": self.releases, "epsilon": self.epsilon,
                "noise_share_std": noise_share_std(self.noise_multiplier, self.clip_norm, len(splits)),
                "epsilon_with_selection": privacy_spent(
                    self.noise_multiplier, self.releases + selection_releases, self.delta),
            })
            # What the row spent in all (read by the evaluation's epsilon column and total).
            self.epsilon_total = self.chosen["epsilon_with_selection"]
            policy = full_participation_policy(1, clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier)
            self.privacy_releases = [policy.spec(self.noise_multiplier)] * (self.releases + selection_releases)
        return personaliser.finetune_predict(bases, splits, epochs, seed, (1.0,))[1.0]


def dp_row_name(epsilon: float) -> str:
    return f"federated + DP (ε={epsilon:.2f})"


def federated_methods(config: ProtocolConfig | None = None, neural: NeuralConfig | None = None, *,
                      target_epsilon: float = DEFAULT_TARGET_EPSILON, delta: float = DEFAULT_DELTA,
                      clip_norm: float = DEFAULT_CLIP_NORM, rounds: int = FEDERATED_ROUNDS,
                      local_epochs: int = FEDERATED_LOCAL_EPOCHS, dp_ensemble: int = 1) -> dict:
    """``--methods restwise.simulation.evaluate_federated:federated_methods``: the two rows.

    The no-DP row is an ensemble of ``neural.n_seeds`` runs like the other neural rows; the DP
    row is ``dp_ensemble`` run(s) (default one): every ensemble member is another
    ``rounds`` releases of the same persons' data, so at a fixed epsilon an ensemble of k runs
    needs about sqrt(k) times the noise in each."""
    config = config or ProtocolConfig()
    neural = neural or NeuralConfig()
    plain = FederatedMethod(rounds, local_epochs, cfg=neural, config=config)
    private = FederatedMethod(rounds, local_epochs, cfg=replace(neural, n_seeds=int(dp_ensemble)),
                              config=config, clip_norm=clip_norm,
                              target_epsilon=target_epsilon, delta=delta)
    return {"federated (no DP)": plain, dp_row_name(private.epsilon): private}


__all__ = ["FederatedMethod", "federated_methods", "federated_train", "noise_share_std",
           "privacy_spent", "calibrate", "dp_row_name", "DEFAULT_CLIP_NORM", "DEFAULT_TARGET_EPSILON",
           "DEFAULT_DELTA"]
