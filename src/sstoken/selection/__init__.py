"""Token selection: the signals, the selectors that turn them into a keep mask, and the LM head that computes them.

* :mod:`~sstoken.selection.scoring`: the maths, as pure tensor functions (REL, min-max normalisation, the ssToken
  score, top-ρ masks, masked means, the loss's normaliser).
* :mod:`~sstoken.selection.selectors`: the selector registry (full, random, rel, attn, sstoken, rho1,
  tokencleaning): each selector turns :class:`~sstoken.selection.selectors.Signals` into a keep mask.
* :mod:`~sstoken.selection.signals`: the one pipeline, batch → forward (attention share captured) → signals →
  keep mask, used by training, ``sstoken inspect`` and the benchmarks.
* :mod:`~sstoken.selection.attention`: the context-attention share, computed inside one layer's attention call.
* :mod:`~sstoken.selection.history`: where the history NLL comes from (the base model, an EMA of the weights).
* :mod:`~sstoken.selection.nll_cache`: the on-disk cache of a model's per-token NLL, with its fingerprints.
* :mod:`~sstoken.selection.lm_head`: sstoken's LM head: per-token NLL of response rows and the kept-token loss,
  without batch × length × vocabulary logits.
"""
