"""What every model learned from one release of bounded statistics shares (the linear head,
the early warning): its run configuration, the check that the server solves toward the prior
the run names, the solve itself, and the check of a delivered model.

A run's model configuration is JSON naming the architecture, its feature spec (version and
sha256), the target series and the sha256 of the public prior the server solves toward. The
server refuses to solve toward any other prior than the one named (a run cannot silently
change its prior); a device refuses a configuration of another feature spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from restwise.common.arrays import arrays_sha256
from restwise.common.errors import ModelError
from restwise.models.linear_head import PriorWeights, solve_with_prior, unpack_statistics
from restwise.models.prior import PublicPrior
from restwise.models.registry import ReleasedSum


@dataclass(frozen=True)
class StatisticsModel:
    """One architecture's constants: its name, feature spec, number of shared weights, target
    bound, and its shipped prior (loaded and verified on first use)."""

    name: str
    feature_spec_version: int
    feature_spec_sha256: Callable[[], str]
    n_features: int
    target_bound: float
    shipped_prior: Callable[[], PublicPrior]

    def model_config(self, target: str) -> str:
        prior = self.shipped_prior()
        prior.target(target)  # PriorError when the prior has no weights for it
        return json.dumps({"architecture": self.name, "feature_spec_version": self.feature_spec_version,
                           "feature_spec_sha256": self.feature_spec_sha256(), "target": target,
                           "prior_sha256": prior.sha256}, sort_keys=True)

    def parse(self, model_config: str) -> dict:
        """The run's configuration; ModelError when it is not this architecture's or its
        feature spec is not the one this code computes."""
        try:
            cfg = json.loads(model_config)
            ok = isinstance(cfg, dict) and cfg.get("architecture") == self.name \
                and isinstance(cfg.get("target"), str) and isinstance(cfg.get("prior_sha256"), str)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelError(f"not a {self.name} model configuration")
        if cfg.get("feature_spec_version") != self.feature_spec_version \
                or cfg.get("feature_spec_sha256") != self.feature_spec_sha256():
            raise ModelError(f"the run's {self.name} model uses feature spec {cfg.get('feature_spec_version')!r} "
                             f"(sha256 {str(cfg.get('feature_spec_sha256'))[:12]}...); this Restwise computes version "
                             f"{self.feature_spec_version} ({self.feature_spec_sha256()[:12]}...): refusing it")
        return cfg

    def prior_weights(self, model_config: str) -> PriorWeights:
        """The prior the run names, which must be the shipped one (PriorError when the shipped
        file fails its checks; ModelError when the run names another prior)."""
        cfg = self.parse(model_config)
        prior = self.shipped_prior()
        if prior.sha256 != cfg["prior_sha256"]:
            raise ModelError(f"the run was configured with the prior {cfg['prior_sha256'][:12]}...; this server ships "
                             f"{prior.sha256[:12]}...: refusing to solve toward another prior")
        return prior.weights_for(cfg["target"])

    def solve(self, model_config: str, released: ReleasedSum) -> list[np.ndarray]:
        """The released model: the PSD projection and the ridge solve toward the prior with
        the known noise of the sum (``linear_head.solve_with_prior``), kept as float32 -
        exactly what the ledger's model hash names and the devices receive."""
        prior = self.prior_weights(model_config)
        A, b = unpack_statistics(released.total, self.n_features, self.target_bound)
        w = solve_with_prior(A, b, prior, noise_std=released.noise_std, devices=released.survivors,
                             target_bound=self.target_bound)
        return [w.astype(np.float32)]

    def delivered(self, model_config: str, shared: list[np.ndarray]) -> tuple[np.ndarray, str, dict]:
        """(the delivered weights, their hash, the run's configuration); ModelError when the
        delivery is not one array of this model's weights or of another feature spec."""
        cfg = self.parse(model_config)
        if len(shared) != 1 or np.asarray(shared[0]).shape != (self.n_features,):
            raise ModelError(f"a delivered {self.name} model is one array of {self.n_features} weights")
        released = np.asarray(shared[0], dtype=np.float32)
        if not np.all(np.isfinite(released)):
            raise ModelError(f"the delivered {self.name} model holds NaN or inf")
        return released.astype(np.float64), arrays_sha256([released]), cfg


__all__ = ["StatisticsModel"]
