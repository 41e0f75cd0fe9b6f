"""Seeing the selection: the training plots (:mod:`~sstoken.report.plots`), the per-token inspection
(:mod:`~sstoken.report.inspector`) and its self-contained HTML page (:mod:`~sstoken.report.page`).
"""
