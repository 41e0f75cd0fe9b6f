"""The self-contained HTML page of ``sstoken inspect``.

Everything the page needs (styles, the mode switch, the tooltip) is inline, so the file works from disk with
no network. Every piece of text that comes from the data or the tokenizer goes through :func:`html.escape`;
the script builds the tooltip with ``textContent`` only, so token text is never parsed as markup.

Shading: each response token carries its three signals as CSS custom properties (``--rel``, ``--attn``,
``--score``, all in [0, 1]); the selected mode is an attribute on ``<body>`` and the stylesheet picks the
property (and a hue per mode) from it. The default mode therefore shades correctly even with scripts off.
"""

from __future__ import annotations

import html

MODES = {
    # mode: (label in the switch, RGB of the shading hue)
    "score": ("combined score", (128, 64, 200)),
    "rel": ("normalised REL", (226, 118, 20)),
    "attn": ("attention share", (30, 110, 225)),
}

# Background alpha = floor + span * value, so a zero-valued response token is still visibly a response token.
_ALPHA_FLOOR = 0.05
_ALPHA_SPAN = 0.65

# Control characters other than the three spelled out below are drawn as their Unicode "control picture".
_WHITESPACE_MARKS = {" ": "·", "\t": "⇥", "\n": "↵"}


def visible_piece_html(piece: str) -> str:
    """HTML for a decoded token piece with whitespace and control characters made visible, text escaped.

    A space shows as ``·``, a tab as ``⇥``, a newline as ``↵`` followed by a real line break, other control
    characters as their control-picture glyph; an empty piece (the leading bytes of a character that the
    next token completes) shows as a faint ``…``.
    """
    if piece == "":
        return '<span class="ws" aria-label="partial character">…</span>'
    out = []
    for char in piece:
        if char in _WHITESPACE_MARKS:
            out.append(f'<span class="ws">{_WHITESPACE_MARKS[char]}</span>')
            if char == "\n":
                out.append("<br>")
        elif ord(char) < 0x20 or char == "\x7f":
            picture = "\u2421" if char == "\x7f" else chr(0x2400 + ord(char))
            out.append(f'<span class="ws">{picture}</span>')
        else:
            out.append(html.escape(char))
    return "".join(out)


def _num(value) -> str:
    """A number for a data attribute or a table cell: 4 significant digits, '' when absent."""
    if value is None:
        return ""
    return f"{value:.4g}"


def _clamp01(value) -> float:
    return min(1.0, max(0.0, float(value or 0.0)))


def token_html(token: dict) -> str:
    """One token ``<span>``: context tokens dimmed and inert, response tokens focusable with their signals."""
    classes = ["tok"]
    inner = visible_piece_html(token["text"])
    if token["special"]:
        classes.append("special")
        inner = f'<span class="badge">{html.escape(token["text"])}</span>'
    if token["role"] != "response":
        classes.append("ctx")
        return f'<span class="{" ".join(classes)}">{inner}</span><wbr>'
    classes.append("resp")
    if token["kept"]:
        classes.append("kept")
    style = (f'--rel:{_clamp01(token["rel_norm"]):.4f};--attn:{_clamp01(token["attention_share"]):.4f};'
             f'--score:{_clamp01(token["score"]):.4f}')
    data = {
        "pos": token["position"],
        "text": token["text"],  # the raw piece, for the tooltip (the visible text has whitespace marks)
        "nll": _num(token["nll"]),
        "hnll": _num(token["history_nll"]),
        "rel": _num(token["rel"]),
        "reln": _num(token["rel_norm"]),
        "attn": _num(token["attention_share"]),
        "score": _num(token["score"]),
        "weight": _num(token.get("weight", 1.0)),
        "kept": "1" if token["kept"] else "0",
    }
    attributes = " ".join(f'data-{key}="{html.escape(str(value), quote=True)}"' for key, value in data.items())
    return (f'<span class="{" ".join(classes)}" tabindex="0" aria-describedby="tip" style="{style}" {attributes}>'
            f"{inner}</span><wbr>")


def _settings_rows(settings: dict) -> str:
    labels = [
        ("model", "model"), ("adapter", "adapter"), ("data", "data"), ("method", "method"),
        ("loss_type", "loss type"), ("rho", "ρ"),
        ("gamma", "γ"), ("score_gamma", "γ used for the score"), ("layer", "attention layer"),
        ("max_seq_length", "max sequence length"), ("samples", "samples"), ("history", "history"),
    ]
    rows = []
    for key, label in labels:
        if key in settings and settings[key] is not None:
            rows.append(f'<div><dt>{html.escape(label)}</dt><dd>{html.escape(str(settings[key]))}</dd></div>')
    return "\n".join(rows)


def _summary_rows(samples: list[dict]) -> str:
    rows = []
    for sample in samples:
        s = sample["summary"]
        rows.append(
            f'<tr><td><a href="#sample-{sample["index"]}">{sample["index"]}</a></td>'
            f'<td>{s["n_tokens"]}</td><td>{s["n_response"]}</td><td>{s["n_kept"]}</td>'
            f'<td>{_num(s["mean_rel"])}</td><td>{_num(s["mean_attention_share"])}</td>'
            f'<td>{_num(s["mean_score"])}</td><td>{_num(s["mean_nll"])}</td>'
            f'<td>{_num(s.get("mean_weight", 1.0))}</td></tr>'
        )
    return "\n".join(rows)


def _sample_html(sample: dict) -> str:
    s = sample["summary"]
    tokens = "".join(token_html(token) for token in sample["tokens"])
    heading = (f'Sample {sample["index"]}: {s["n_kept"]} of {s["n_response"]} response tokens kept; '
               f'mean REL {_num(s["mean_rel"])}, mean attention share {_num(s["mean_attention_share"])}, '
               f'mean score {_num(s["mean_score"])}')
    return (f'<section class="sample" id="sample-{sample["index"]}" data-index="{sample["index"]}" '
            f'data-kept="{s["n_kept"]}">\n<h2>{html.escape(heading)}</h2>\n<div class="tokens">{tokens}</div>\n'
            f"</section>")


def _mode_switch(default_mode: str) -> str:
    options = []
    for mode, (label, rgb) in MODES.items():
        checked = " checked" if mode == default_mode else ""
        swatch = f"background:linear-gradient(90deg,rgba({rgb[0]},{rgb[1]},{rgb[2]},{_ALPHA_FLOOR})," \
                 f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{_ALPHA_FLOOR + _ALPHA_SPAN}))"
        options.append(f'<label><input type="radio" name="mode" value="{mode}"{checked}> {html.escape(label)} '
                       f'<span class="swatch" style="{swatch}"></span></label>')
    return "\n".join(options)


def _mode_css() -> str:
    rules = []
    variable = {"score": "--score", "rel": "--rel", "attn": "--attn"}
    for mode, (_, (r, g, b)) in MODES.items():
        rules.append(f'body[data-mode="{mode}"] .tok.resp {{ background: rgba({r}, {g}, {b}, '
                     f'calc({_ALPHA_FLOOR} + {_ALPHA_SPAN} * var({variable[mode]}))); }}')
    return "\n".join(rules)


_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1rem 1.5rem 4rem; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.4rem; margin: .2rem 0 .6rem; }
h2 { font-size: 1rem; font-weight: 600; margin: 0 0 .5rem; }
table { border-collapse: collapse; font-size: .85rem; }
th, td { padding: .15rem .6rem; text-align: left; border-bottom: 1px solid #e4e4e7; }
td { font-variant-numeric: tabular-nums; }
dl.settings { display: flex; flex-wrap: wrap; gap: .3rem .5rem; margin: .6rem 0 1rem; font-size: .85rem; }
dl.settings div { background: #f4f4f5; border-radius: 4px; padding: .1rem .5rem; }
dl.settings dt { display: inline; color: #52525b; margin-right: .35rem; }
dl.settings dd { display: inline; margin: 0; font-weight: 600; }
.note { background: #fff7e0; border: 1px solid #f0d58a; border-radius: 6px; padding: .4rem .7rem;
        font-size: .85rem; margin: .6rem 0; }
fieldset.modes { border: 1px solid #d4d4d8; border-radius: 6px; padding: .3rem .8rem; margin: .8rem 0; }
fieldset.modes label { margin-right: 1.2rem; cursor: pointer; white-space: nowrap; }
.swatch { display: inline-block; width: 56px; height: .8rem; vertical-align: middle; border-radius: 3px;
          border: 1px solid #ccc; }
.legend { font-size: .85rem; color: #444; }
.legend .tok { padding: 0 .3rem; }
.sample { border: 1px solid #e4e4e7; border-radius: 8px; padding: .7rem .9rem; margin: 1rem 0; }
.tokens { font: 14px/1.9 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; word-break: break-all; }
.tok { border-radius: 2px; padding: 1px 0; }
.tok.ctx { color: #8a8a8e; }
.tok.resp { cursor: help; color: #111; margin-right: 1px; }  /* the gap shows where tokens split */
.tok.kept { box-shadow: inset 0 -3px 0 #13795b; }
.tok.resp:focus { outline: 2px solid #111; outline-offset: 1px; }
.ws { color: #a1a1aa; }
.tok.resp .ws { color: #71717a; }
.badge { font-size: .72rem; border: 1px solid #a1a1aa; border-radius: 4px; padding: 0 .25rem; margin: 0 1px;
         background: #f4f4f5; color: #52525b; }
.tok.resp .badge { color: #111; background: transparent; }
#tip { position: absolute; z-index: 10; display: none; pointer-events: none; background: #18181b; color: #fafafa;
       border-radius: 6px; padding: .45rem .6rem; font: 12px/1.45 ui-monospace, Menlo, Consolas, monospace;
       box-shadow: 0 4px 14px rgba(0,0,0,.25); white-space: pre; }
#tip.shown { display: block; }
"""

_SCRIPT = """
(function () {
  "use strict";
  var body = document.body;
  var tip = document.getElementById("tip");
  Array.prototype.forEach.call(document.querySelectorAll('input[name="mode"]'), function (input) {
    input.addEventListener("change", function () {
      if (input.checked) { body.setAttribute("data-mode", input.value); }
    });
  });
  function describe(el) {
    var d = el.dataset;
    var text = d.text;
    return [
      "token     " + JSON.stringify(text) + "  (position " + d.pos + ")",
      d.kept === "1" ? "KEPT (carries loss)" : "dropped (no loss)",
      "REL       " + d.rel + "   (history NLL " + d.hnll + " - NLL " + d.nll + ")",
      "norm REL  " + d.reln,
      "attn      " + d.attn,
      "score     " + d.score,
      "weight    " + d.weight + "   (its loss is weight x NLL, when kept)"
    ].join("\\n");
  }
  function show(el) {
    tip.textContent = describe(el);
    tip.classList.add("shown");
    var box = el.getBoundingClientRect();
    // Left-aligned with the token, kept inside the window.
    var right = window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8;
    var left = Math.max(4, Math.min(box.left + window.scrollX, right));
    tip.style.left = left + "px";
    // Below the token, or above it when there is no room left in the window.
    var below = box.bottom + 6 + tip.offsetHeight <= document.documentElement.clientHeight;
    tip.style.top = ((below ? box.bottom + 6 : box.top - 6 - tip.offsetHeight) + window.scrollY) + "px";
  }
  function hide() { tip.classList.remove("shown"); }
  function target(event) {
    var el = event.target;
    return el && el.closest ? el.closest(".tok.resp") : null;
  }
  document.addEventListener("mouseover", function (e) { var el = target(e); if (el) { show(el); } });
  document.addEventListener("mouseout", function (e) { if (target(e)) { hide(); } });
  document.addEventListener("focusin", function (e) { var el = target(e); if (el) { show(el); } });
  document.addEventListener("focusout", function (e) { if (target(e)) { hide(); } });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") { hide(); } });
})();
"""


def render_page(result: dict) -> str:
    """The whole inspector page for the dict built by :func:`sstoken.report.inspect_samples`."""
    settings = result["settings"]
    mode = settings.get("default_mode", "score")
    notes = "".join(f'<p class="note">{html.escape(note)}</p>' for note in result.get("notes", []))
    samples = "\n".join(_sample_html(sample) for sample in result["samples"])
    title = f'sstoken inspect: {settings.get("method", "")} on {settings.get("data", "")}'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}
{_mode_css()}
</style>
</head>
<body data-mode="{html.escape(mode, quote=True)}">
<h1>{html.escape(title)}</h1>
{notes}
<dl class="settings">
{_settings_rows(settings)}
</dl>
<table class="summary">
<thead><tr><th>sample</th><th>tokens</th><th>response</th><th>kept</th><th>mean REL</th><th>mean attn</th>
<th>mean score</th><th>mean NLL</th><th>mean weight</th></tr></thead>
<tbody>
{_summary_rows(result["samples"])}
</tbody>
</table>
<fieldset class="modes"><legend>Shade response tokens by</legend>
{_mode_switch(mode)}
</fieldset>
<p class="legend"><span class="tok ctx">dimmed</span> context (not trained) ·
<span class="tok kept" style="padding:0 .3rem">underlined</span> kept (carries loss) ·
<span class="ws">·</span> space <span class="ws">↵</span> newline <span class="badge">special</span> special token ·
hover or Tab onto a response token for its numbers.</p>
{samples}
<div id="tip" role="tooltip"></div>
<script>{_SCRIPT}</script>
</body>
</html>
"""
