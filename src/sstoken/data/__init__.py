"""Training data: where rows come from, what formats they are in, and how they become token ids and labels.

* :mod:`~sstoken.data.spec`: the data spec of a recipe (a path, a Hub id, a mapping, a mixture), validated.
* :mod:`~sstoken.data.sources`: loading a spec (files, folders, saved datasets, Hub datasets, mixtures) and
  encoding it with ``Dataset.map`` into a cache; :func:`~sstoken.data.sources.load_rows` is the one loader of
  every command.
* :mod:`~sstoken.data.reading`: the strict JSON Lines reader (errors name ``path:line``).
* :mod:`~sstoken.data.formats`: the row formats (messages, prompt/completion, alpaca, ShareGPT, text),
  detected and validated into a :class:`~sstoken.data.formats.ParsedRow`.
* :mod:`~sstoken.data.templates`: rendering conversations with the chat template and finding the trained spans.
* :mod:`~sstoken.data.encoding`: a parsed row → ``input_ids`` and ``labels`` (-100 on context tokens).
"""
