"""Evaluation: lm-eval-harness tasks built from local files (:mod:`~sstoken.evaluation.tasks`), running them
(:mod:`~sstoken.evaluation.harness`), what to score (:mod:`~sstoken.evaluation.targets`), the NLL of held-out
responses (:mod:`~sstoken.evaluation.held_out`) and paired statistics (:mod:`~sstoken.evaluation.stats`).
"""
