"""Training: :class:`~sstoken.training.config.SSTokenConfig` and :class:`~sstoken.training.trainer.SSTokenTrainer`
(TRL's ``SFTConfig`` / ``SFTTrainer`` with token selection), the policy for every ``SFTConfig`` field
(:mod:`~sstoken.training.field_policy`), the finite-weights guard (:mod:`~sstoken.training.guards`) and the
selection snapshots that the plots read (:mod:`~sstoken.training.snapshots`).
"""
